"""A timm backbone with SLCA blocks injected after chosen stages (``slca``), or the same
backbone alone (``backbone``), for side-by-side comparison.

Injection uses forward hooks on the stage modules listed in timm's ``feature_info``
(``layer1..layer4`` of ResNets and SE-ResNe(X)ts, ``layers.0..3`` of Swin V2, ``stages.*``
of ConvNeXt, ``blocks.*`` of EfficientNets, ...): the hook replaces the stage output
with its SLCA-gated version, so the backbone's own ``forward_features`` / ``forward_head``
run unchanged and any timm model with a ``feature_info`` works. Swin V2 stages emit
NHWC token maps (timm's ``output_fmt == "NHWC"``); the gate is permuted to match.

Geometry: the backbone sees the image padded to a square at the bottom/right, like the
SAM encoder's input, so the 64x64 SAM grid and every stage's feature map cover the
same field of view and the SLCA gate lines up with the features it modulates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from stages.models.layers.slca import SLCA
from cache.schema import EMBED_SHAPE
from stages.models.registry import register_model

SAM_CHANNELS = EMBED_SHAPE[0]


def resolve_stages(feature_info: list[dict], stages: str | Sequence[int | str]) -> list[int]:
    """Stage spec -> indices into ``feature_info``.

    ``"all"``: every stage at stride >= 4 (the stem is skipped); ``"last2"`` etc.: the last
    N of those; else a comma list / sequence of indices (negative from the end) or module
    names (``layer3``, ``layers.2``)."""
    main = [i for i, d in enumerate(feature_info) if d["reduction"] >= 4]
    names = [d["module"] for d in feature_info]
    if isinstance(stages, str):
        spec = stages.strip()
        if spec == "all":
            return main
        if spec.startswith("last") and spec[4:].isdigit():
            return main[-int(spec[4:]):]
        items: list[int | str] = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(stages)
    out = []
    for it in items:
        if isinstance(it, str) and it.lstrip("-").isdigit():
            it = int(it)
        if isinstance(it, int):
            if not -len(names) <= it < len(names):
                raise ValueError(f"SLCA stage {it} out of range; this backbone has stages {names}")
            out.append(it % len(names))
        elif it in names:
            out.append(names.index(it))
        else:
            raise ValueError(f"unknown SLCA stage {it!r}; this backbone has stages {names}")
    if not out:
        raise ValueError(f"no SLCA stage selected from {stages!r}; this backbone has stages {names}")
    return sorted(set(out))


def create_backbone(name: str, num_classes: int, img_size: int, drop_rate: float = 0.0,
                    pretrained: bool | str | Path = False, **kwargs) -> nn.Module:
    """A timm classifier. ``img_size`` goes to models that need it (Swin V2, ViTs); CNNs take
    any size.

    ``pretrained``: False, random init (nothing is downloaded); True, timm's own pretrained
    weights (ImageNet for resnet18 ...), through its Hugging Face hub download, which reads
    the Hugging Face cache first (``HF_HOME`` / ``HF_HUB_CACHE``) and honours
    ``HF_HUB_OFFLINE``; a path, a local timm checkpoint loaded by the same timm loader
    (``pretrained_cfg_overlay=dict(file=path)``), so a file and a download are adapted alike
    (the classifier is re-initialised for another class count). Raises ValueError (one line)
    when the weights are unavailable or do not fit."""
    _check_name(name)
    base = dict(pretrained=bool(pretrained), num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    if isinstance(pretrained, (str, Path)):
        _check_file(name, img_size, base, Path(pretrained))
        base["pretrained_cfg_overlay"] = dict(file=str(pretrained))
    elif pretrained:
        check_hub_weights(name)
    if not pretrained:
        return _build(name, img_size, base)
    try:
        net = _build(name, img_size, base)
    except OSError as e:  # huggingface_hub's LocalEntryNotFoundError, urllib's URLError, ...
        if isinstance(pretrained, (str, Path)):
            raise ValueError(f"{pretrained}: cannot read backbone weights ({_first_line(e)}); "
                             "pass a timm checkpoint (.pth/.pt/.bin/.safetensors)") from None
        raise ValueError(_unavailable(name, _first_line(e))) from None
    except RuntimeError as e:  # load_state_dict: shapes differ; or timm has no weights for it
        where = pretrained if isinstance(pretrained, (str, Path)) else f"backbone {name}"
        raise ValueError(f"{where}: timm could not load the pretrained weights ({_first_line(e)}); "
                         "pass a checkpoint of this architecture with --backbone-weights PATH") from None
    return net


def _check_name(name: str) -> None:
    if name not in timm.list_models():
        raise ValueError(f"unknown timm backbone {name!r}; e.g. resnet18, resnet50, resnet152, "
                         "seresnext50_32x4d, legacy_senet154, swinv2_tiny_window8_256")


def _build(name: str, img_size: int, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError:  # CNN constructors have no img_size
        return timm.create_model(name, **kwargs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _unavailable(name: str, why: str) -> str:
    from huggingface_hub import constants

    return (f"backbone {name}: timm's pretrained weights are not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and cannot be downloaded ({why}); run once online to cache them, "
            "or pass --backbone-weights PATH (a local timm checkpoint)")


def check_hub_weights(name: str) -> None:
    """Refuse, before anything is built or written, a backbone timm has no weights for, and
    (with HF_HUB_OFFLINE set) one whose weights are not cached: in the Hugging Face cache for
    hub weights, in torch's hub cache for the few that timm fetches from a plain URL (e.g.
    legacy_senet154), which timm would otherwise try to download regardless."""
    from huggingface_hub import constants, try_to_load_from_cache

    _check_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(f"backbone {name}: timm has no pretrained weights for it; drop --pretrained or pass "
                         "--backbone-weights PATH")
    if not constants.HF_HUB_OFFLINE:
        return
    if cfg.hf_hub_id:
        repo, _, rev = cfg.hf_hub_id.partition("@")
        if not any(isinstance(try_to_load_from_cache(repo, f, revision=rev or None), str)
                   for f in ("model.safetensors", "pytorch_model.bin")):
            raise ValueError(_unavailable(name, f"HF_HUB_OFFLINE is set and {repo} is not cached"))
    elif not (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file():
        raise ValueError(_unavailable(name, f"HF_HUB_OFFLINE is set and {Path(cfg.url).name} is not in "
                                            f"{torch.hub.get_dir()}"))


def _check_file(name: str, img_size: int, kwargs: dict, path: Path) -> None:
    """Check a local checkpoint against the architecture before timm loads it: timm loads
    non-strictly when it re-initialises the classifier, so a checkpoint of another
    architecture would load nothing (after a screenful of unexpected keys); refuse it in one
    line instead. The reference model is built on the meta device (no memory, no init)."""
    from timm.models import load_state_dict

    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights not found; pass a local timm checkpoint file")
    try:
        state = load_state_dict(str(path))
    except Exception as e:  # pickle, zip, safetensors header errors alike: an unreadable file
        raise ValueError(f"{path}: cannot read backbone weights ({_first_line(e)}); pass a timm checkpoint "
                         "(.pth/.pt/.bin/.safetensors)") from None
    with torch.device("meta"):
        ref = _build(name, img_size, {**kwargs, "pretrained": False})
    own = ref.state_dict()
    head = str(ref.pretrained_cfg.get("classifier", "")) + "."
    fits = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    other = [k for k, v in state.items() if k in own and own[k].shape != v.shape and not k.startswith(head)]
    if other or len(fits) < 0.5 * len(own):
        why = f"{other[0]} has shape {tuple(state[other[0]].shape)}, not {tuple(own[other[0]].shape)}" if other \
            else f"only {len(fits)} of {len(own)} tensors fit"
        raise ValueError(f"{path}: not a checkpoint of backbone {name} ({why}); pass one of this architecture, "
                         "or the matching --backbone")


class SLCAClassifier(nn.Module):
    """timm backbone + SLCA. ``forward(image (B,3,S,S), sam (B,256,64,64)) -> (B,K)``.

    Args:
        backbone: timm model name.
        num_classes: K.
        img_size: S, the side of the (square) image input.
        slca: False builds the plain backbone (``sam`` is then ignored).
        stages: where SLCA goes (``resolve_stages``).
        window, hidden, act, gate, norm, spatial, add: the SLCA block (``layers.slca.SLCA``).
        fuse: also add ``Linear(LayerNorm(mean_hw(sam)))`` (B,K) to the backbone's logits,
            so the classifier reads the SAM descriptor directly, as the probe does (a gate
            can only re-weight what a backbone trained on few labels has learnt).
        branch: also add the logits of a ``SAMHead`` (the sam-head CNN on the SAM grid), so
            the model sees everything sam-head sees, plus the image (late fusion).
        branch_detach: in training, the summed logits carry no gradient into the branch, so
            it learns only from its own loss (``--slca-branch-sup``): a sam-head inside the
            model, with the image part learning what it misses (boosting-like), instead of
            a branch that leans on the image part. No effect at inference.
        prior: also add the logits of a frozen ``LinearProbe`` (the probe, fitted by
            scikit-learn before training starts), so the network starts from the probe's
            answer and learns what the pooled SAM descriptor misses (stacking).
        prior_weight: the prior's logits are multiplied by this (1: stacking; 0 while the
            network trains alone, as ``--slca-prior-blend`` does before choosing it on validation).
        distill: also a 1x1 conv from the last SLCA stage's own output (before its gate) to
            the 256 SAM channels; ``forward(..., aux=True)`` then also returns, as ``"distill"``,
            the MSE between it and the SAM features pooled to that stage's grid and
            standardised per channel, so the backbone learns SAM-like features from the cache
            for free.
        drop_rate: dropout before the classifier.
        pretrained: the backbone's initial weights (``create_backbone``): False (random), True
            (timm's, from the hub or its cache) or a local checkpoint path. Training only: a
            saved model.pt is rebuilt without it and loads its own weights, so nothing is
            downloaded to evaluate or predict.
        backbone_kwargs: extra timm constructor arguments (e.g. a narrower ``embed_dim``).
    """

    def __init__(self, backbone: str = "resnet18", num_classes: int = 2, img_size: int = 64,
                 slca: bool = True, stages: str | Sequence[int | str] = "all", window: int = 8,
                 hidden: int = 64, act: str = "gelu", gate: str = "residual", fuse: bool = False,
                 norm: bool = False, branch: bool = False, branch_detach: bool = False, spatial: bool = False,
                 add: bool = False,
                 prior: bool = False, prior_weight: float = 1.0, distill: bool = False, drop_rate: float = 0.0,
                 backbone_kwargs: dict | None = None, pretrained: bool | str | Path = False):
        super().__init__()
        self.net = create_backbone(backbone, num_classes, img_size, drop_rate, pretrained,
                                   **(backbone_kwargs or {}))
        self.uses_image, self.uses_sam = True, slca
        self.channels_last = getattr(self.net, "output_fmt", "NCHW") == "NHWC"
        info = list(getattr(self.net, "feature_info", []) or [])
        self.slca = nn.ModuleDict()
        self.stage_names: list[str] = []
        self._sam: torch.Tensor | None = None
        self._stage_out: torch.Tensor | None = None  # the distilled stage's output, within one forward
        self.distill: nn.Module | None = None
        self.fuse = nn.Sequential(nn.LayerNorm(SAM_CHANNELS), nn.Linear(SAM_CHANNELS, num_classes)) \
            if slca and fuse else None
        self.branch = self.prior = None
        self.prior_weight = float(prior_weight)  # a float, not a buffer: model_kwargs carries it
        self.branch_detach = bool(branch_detach)
        if slca and (branch or prior):
            # imported here, not at the top: sam_head registers its models on import, and the
            # registry lists models in registration order (slca, backbone first)
            from stages.models.sam_head import LinearProbe, SAMHead

            self.branch = SAMHead(num_classes, drop_rate=drop_rate or 0.1) if branch else None
            self.prior = LinearProbe(num_classes).requires_grad_(False) if prior else None
        if not slca:
            return
        if not info:
            raise ValueError(f"backbone {backbone!r} exposes no feature_info stages; SLCA cannot reach them, "
                             "use a timm CNN (resnet*, seresnext*, convnext*, efficientnet*) or swinv2_*")
        for i in resolve_stages(info, stages):
            name, chs = info[i]["module"], int(info[i]["num_chs"])
            key = name.replace(".", "_")
            self.slca[key] = SLCA(chs, SAM_CHANNELS, window, hidden, act, gate, norm, spatial, add)
            self.stage_names.append(name)
            self.net.get_submodule(name).register_forward_hook(_Inject(self, key))
        if distill:
            self.distill, self.distill_key = nn.Conv2d(chs, SAM_CHANNELS, 1), key

    def forward_features(self, image: torch.Tensor, sam: torch.Tensor | None = None) -> torch.Tensor:
        """(B,3,S,S), (B,256,64,64) -> the backbone's last feature map (unpooled)."""
        return self._features(image, sam)[0]

    def _features(self, image: torch.Tensor, sam: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last feature map and the distilled stage's output (None without ``distill``).
        The SAM input and the stage output live on the module only during this forward (the
        hooks read and write them there); nothing is kept once it returns."""
        self._sam, self._stage_out = (sam if self.uses_sam else None), None
        try:
            return self.net.forward_features(image), self._stage_out
        finally:
            self._sam = self._stage_out = None

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last feature map -> (B,K) logits (or pooled features when ``pre_logits``)."""
        return self.net.forward_head(x, pre_logits=pre_logits)

    def forward(self, image: torch.Tensor, sam: torch.Tensor | None = None,
                prior: torch.Tensor | None = None, aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """-> (B,K) logits; with ``aux``, (logits, what training may add losses on): ``"image"``,
        the (B,K) logits of the image part alone (the SLCA-steered backbone, plus ``fuse``),
        ``"branch"``, the sam-head branch's own (B,K) logits (with ``branch``), and ``"distill"``, the
        scalar distillation loss (with ``distill``). ``prior`` (B,K) replaces the prior's own
        logits (training on out-of-fold probe logits); ignored without ``prior`` in the
        constructor."""
        x, stage = self._features(image, sam)
        logits = self.forward_head(x)
        extra: dict[str, torch.Tensor] = {}
        if self.fuse is not None:
            logits = logits + self.fuse(sam.mean(dim=(2, 3)).to(logits.dtype))
        extra["image"] = logits
        if self.branch is not None:
            extra["branch"] = self.branch(None, sam).to(logits.dtype)
            logits = logits + (extra["branch"].detach() if self.branch_detach else extra["branch"])
        if self.prior is not None and self.prior_weight:
            z = self.prior(None, sam) if prior is None else prior
            logits = logits + self.prior_weight * z.to(logits.dtype)
        if not aux:
            return logits
        if self.distill is not None:
            extra["distill"] = self._distill_loss(stage, sam)
        return logits, extra

    def _distill_loss(self, stage: torch.Tensor, sam: torch.Tensor) -> torch.Tensor:
        """MSE between the distilled stage's prediction (B,256,h,w) and the SAM features of
        the same images pooled to (h,w), standardised per channel over the batch
        (LiteMedSAM's are small, std ~0.1)."""
        x = stage.permute(0, 3, 1, 2) if self.channels_last else stage
        pred = self.distill(x).float()
        target = F.adaptive_avg_pool2d(sam.float(), pred.shape[2:])
        mean = target.mean(dim=(0, 2, 3), keepdim=True)
        std = target.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        return F.mse_loss(pred, (target - mean) / std)

    @torch.no_grad()
    def gates(self, sam: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per SLCA stage, the factor applied to each channel on the SAM window grid:
        (B,C,g,g); 1 everywhere is the identity (the residual gate at initialisation)."""
        return {name: block.gate_map(sam, tuple(block.pool(sam).shape[2:]))
                for name, block in zip(self.stage_names, self.slca.values())}

    @torch.no_grad()
    def attention_maps(self, sam: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per SLCA stage, the channel-mean of the gate on the SAM window grid: (B,g,g)."""
        return {name: g.mean(dim=1) for name, g in self.gates(sam).items()}

    def load_backbone(self, path: str | Path) -> tuple[int, int]:
        """Load a local timm checkpoint (``.pth``/``.pt``/``.bin``/``.safetensors``) into the
        backbone already built (notebooks); the classifier layer is skipped when its shape
        differs (other K). Returns (loaded, skipped) tensor counts. Training instead builds
        with ``pretrained=PATH``, timm's own loader."""
        return load_weights(self.net, path)


class _Inject:
    """Forward hook replacing a stage's output by its SLCA-gated version. A plain object
    (not a closure) so that ``copy.deepcopy`` of the classifier re-points it at the copy."""

    def __init__(self, owner: SLCAClassifier, key: str):
        self.owner, self.key = owner, key

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        o = self.owner
        if o._sam is None:
            raise RuntimeError("SLCAClassifier needs the SAM embeddings: call forward(image, sam)")
        if o.distill is not None and self.key == o.distill_key:
            o._stage_out = output
        return o.slca[self.key](output, o._sam, o.channels_last)


def load_weights(net: nn.Module, path: str | Path) -> tuple[int, int]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights not found; pass a local timm checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(fits) < 0.5 * len(own):
        raise ValueError(f"{path}: only {len(fits)} of {len(own)} tensors fit this backbone; "
                         "it is a checkpoint of another architecture")
    net.load_state_dict(fits, strict=False)
    return len(fits), len(own) - len(fits)


# the SLCA-only constructor arguments (model_kwargs of a slca run); backbone drops them
SLCA_OPTIONS = ("stages", "window", "hidden", "act", "gate", "fuse", "norm", "branch", "branch_detach", "spatial",
                "add", "prior", "prior_weight", "distill")


@register_model
def slca(**kwargs) -> SLCAClassifier:
    """Backbone + SLCA (the product's model)."""
    return SLCAClassifier(slca=True, **kwargs)


@register_model
def backbone(**kwargs) -> SLCAClassifier:
    """The same backbone without SLCA (the baseline); SLCA options are ignored."""
    for k in SLCA_OPTIONS:
        kwargs.pop(k, None)
    return SLCAClassifier(slca=False, **kwargs)
