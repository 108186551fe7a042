"""Stage-two networks (nn.Modules only). Classifiers are created by name like timm models:

    from stages.models import create_model
    net = create_model("slca", backbone="resnet18", num_classes=2, img_size=64)

Registered: ``slca`` (timm backbone + SLCA), ``backbone`` (the same without SLCA),
``sam_head`` (small CNN on SAM embeddings), ``probe`` (linear probe on pooled embeddings).
Segmentation heads have their own registry in ``stages.models.heads``.
"""
from . import classifier, sam_head  # noqa: F401  (register the models)
from .classifier import SLCAClassifier
from .layers.slca import SLCA
from .registry import create_model, is_model, list_models, register_model
from .sam_head import LinearProbe, SAMHead

__all__ = ["SLCA", "LinearProbe", "SAMHead", "SLCAClassifier", "create_model", "is_model", "list_models",
           "register_model"]
