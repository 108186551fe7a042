"""Stage two, classification: ``slca`` / ``backbone`` / ``sam-head`` / ``probe`` trained from
a feature store and its raw images.

- ``config``: ``ClassifyConfig`` (every option of ``pipeline train --task classify``);
- ``train``: ``train_classifier``, the classification trainer on ``stages.common.trainer``;
- ``data``, ``augment``: batches of (image, SAM embedding, label);
- ``scoring``, ``metrics``, ``plots``: predictions, metrics and figures of a run;
- ``evaluate``, ``predict``: a saved model.pt on another store, or on new image files;
- ``compare``: every model x labelled fraction x seed, side by side.

Importing this package imports nothing heavy; import the submodule you need.
"""
