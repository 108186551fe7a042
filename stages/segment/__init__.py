"""Stage two, segmentation: prompt-free heads (AutoSAM, CNN, linear) trained on cached
SAM-family embeddings, and a from-scratch UNet baseline on the raw images.

- ``config``: ``SegmentConfig`` (every option of ``pipeline train --task segment``);
- ``train``: ``train_segmentation``, the segmentation trainer on ``stages.common.trainer``;
- ``data``: the store+dataset of masks, canvas targets and logits back to image geometry;
- ``losses``, ``metrics``: CE + soft Dice; Dice/IoU/HD95 per class (3D per volume);
- ``evaluate``, ``predict``: a saved model.pt on a store + dataset, or on new files.

    from stages.segment.config import SegmentConfig
    from stages.segment.train import train_segmentation
    metrics = train_segmentation(SegmentConfig(store="cache/acdc.zarr", data_root="data/acdc",
                                               dataset="acdc-h5", out="runs/autosam", head="autosam"))
"""
