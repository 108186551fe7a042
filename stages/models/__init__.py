"""Stage-two networks (nn.Modules only). Classifiers are created by name like timm models:

    from stages.models import create_model
    net = create_model("slca", backbone="resnet18", num_classes=2, img_size=64)

Registered: ``slca`` (timm backbone + SLCA), ``backbone`` (the same without SLCA),
``sam_head`` (small CNN on SAM embeddings), ``probe`` (linear probe on pooled embeddings).
The registry itself (``stages.models.registry``) imports no model; segmentation heads have
their own in ``stages.models.heads.registry``.
"""
from stages.models import classifier, sam_head  # noqa: F401  (register the models)
from stages.models.classifier import SLCAClassifier
from stages.models.layers.slca import SLCA
from stages.models.registry import MODELS, create_model, is_model, list_models, model_choices, register_model
from stages.models.sam_head import LinearProbe, SAMHead

__all__ = ["MODELS", "SLCA", "LinearProbe", "SAMHead", "SLCAClassifier", "create_model", "is_model", "list_models",
           "model_choices", "register_model"]
