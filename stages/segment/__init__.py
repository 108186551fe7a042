"""Stage two, segmentation: prompt-free heads (AutoSAM, CNN, linear) trained on cached
SAM-family embeddings, and a from-scratch UNet baseline on the raw images.

    from stages.segment import SegmentConfig, train_segmentation, evaluate_segmentation
    metrics = train_segmentation(SegmentConfig(store="cache/acdc.zarr", data_root="data/acdc",
                                               dataset="acdc-h5", out="runs/autosam", head="autosam"))
"""
from .config import HEAD_NAMES, SegmentConfig
from .data import SegmentData
from .evaluate import evaluate_segmentation
from .train import train_segmentation

__all__ = ["HEAD_NAMES", "SegmentConfig", "SegmentData", "evaluate_segmentation", "train_segmentation"]
