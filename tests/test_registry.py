"""The registries: the generic mechanism, and every registered classifier, segmentation
head, encoder and dataset reader exercised by name (as timm's tests/test_models.py runs
over ``list_models()``), so a new registration is tested, or fails, without editing a list.
"""
from __future__ import annotations

import ast
import inspect
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import test_datasets as reader_tests
from stages.datasets import DATASETS, DatasetError, list_datasets, open_dataset
from stages.encoders import DEFAULT_ENCODER, ENCODERS, EncoderError, build_encoder, list_encoders
from stages.models import create_model, list_models, model_choices
from stages.models.heads import HEADS, create_head, list_heads
from stages.models.registry import MODELS, canonical, is_model
from stages.registry import Registry, UnknownNameError

# -- the mechanism ---------------------------------------------------------------------


def test_register_spellings_lookup_and_unknown_names():
    reg = Registry("widget")

    @reg.register
    def plain_one(x=1):
        return ("plain", x)

    @reg.register()
    def called():
        return "called"

    reg.register("acdc-h5")(lambda: "named")
    assert list(reg) == reg.names() == ["plain_one", "called", "acdc-h5"] and len(reg) == 3
    assert reg.names("*-*") == ["acdc-h5"] and reg.names("p*") == ["plain_one"]
    assert "plain-one" in reg and "acdc_h5" in reg and "nope" not in reg and 3 not in reg
    assert reg.canonical("plain-one") == "plain_one" and reg.canonical("acdc_h5") == "acdc-h5"
    assert reg.canonical("not-there") == "not_there"
    assert reg.create("plain-one", x=5) == ("plain", 5) and reg["acdc_h5"]() == "named"
    assert reg.get("called") is called
    with pytest.raises(UnknownNameError, match=r"^unknown widget 'gizmo'; choose one of: plain_one, called, acdc-h5$"):
        reg.get("gizmo")
    assert issubclass(UnknownNameError, ValueError)


def test_a_name_taken_twice_is_refused_but_a_reload_is_not():
    reg = Registry("widget", error=DatasetError, choices_label="known kinds")

    def a():
        return 1

    reg.register("a-b")(a)
    reg.register("a-b")(a)  # the same builder again (a module reloaded): no error
    with pytest.raises(ValueError, match="widget 'a_b' is registered twice"):
        reg.register("a_b")(lambda: 2)  # another builder under the same name, spelt with "_"
    reg.register("c")(partial(int, "3"))
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("c")(partial(int, "4"))
    assert reg.create("a_b") == 1 and reg.create("c") == 3
    with pytest.raises(DatasetError, match="^unknown widget 'z'; known kinds: a-b, c$"):
        reg.create("z")


def test_each_kind_raises_its_own_error_listing_the_choices():
    with pytest.raises(EncoderError, match="unknown encoder 'vit_x'; choose one of: litemedsam, vit_b"):
        build_encoder("vit_x")
    with pytest.raises(DatasetError, match="unknown dataset kind 'nifti'; known kinds: imagefolder, csv"):
        open_dataset("nifti", ".")
    with pytest.raises(ValueError, match="unknown model 'resnet'; choose one of: slca, backbone"):
        create_model("resnet")
    with pytest.raises(ValueError, match="unknown segmentation head 'transunet'; choose one of: autosam"):
        create_head("transunet", 2)


def test_choices_helpers_for_the_cli():
    assert list_encoders()[0] == DEFAULT_ENCODER and list_encoders() == list(ENCODERS)
    assert list_datasets() == ["imagefolder", "csv", "medmnist", "acdc-h5", "synthetic"]
    assert list_models() == ["backbone", "probe", "sam_head", "slca"]
    assert model_choices() == ["backbone", "probe", "sam-head", "slca"]
    assert list_heads() == ["autosam", "cnn", "linear", "unet"] == sorted(HEADS)
    assert canonical("sam-head") == "sam_head" and is_model("sam-head") and not is_model("nope")


REGISTRY_MODULES = {
    "stages/encoders/registry.py": ENCODERS, "stages/datasets/registry.py": DATASETS,
    "stages/models/registry.py": MODELS, "stages/models/heads/registry.py": HEADS,
}


def _imported(path: Path) -> set[str]:
    """Modules a file imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("path", sorted(REGISTRY_MODULES))
def test_registry_modules_import_no_implementation(path):
    """What makes registration cycle-free: the module holding a registry imports neither a
    module that registers into it nor the package __init__ that imports those."""
    root = Path(__file__).resolve().parents[1]
    registry = REGISTRY_MODULES[path]
    implementations = {inspect.unwrap(getattr(fn, "func", fn)).__module__ for _, fn in registry.items()}
    package = path.rsplit("/", 1)[0].replace("/", ".")
    assert implementations and package not in implementations
    imported = _imported(root / path) | _imported(root / "stages/registry.py")
    assert not imported & (implementations | {package}), path
    for module in implementations:  # and each implementation registers through that module
        assert path[:-3].replace("/", ".") in _imported(root / (module.replace(".", "/") + ".py")), module


# -- every classifier ------------------------------------------------------------------

# one argument set every classifier accepts (SAM-only models ignore the backbone options);
# timm's zero_init_last=False so that only SLCA's own zero-initialised conv blocks gradients
CLASSIFIER_KW = dict(num_classes=3, backbone="resnet10t", img_size=64, backbone_kwargs=dict(zero_init_last=False))
CLASSIFIER_CASES = [(name, {}) for name in list_models()] + [("slca", dict(gate="mul", fuse=True)),
                                                             ("slca", dict(norm=True, branch=True)),
                                                             ("slca", dict(spatial=True, add=True))]
# parameters that get an exactly-zero gradient at initialisation, by design: SLCA's residual
# gate starts at the identity with its last conv (fc2) zero, so nothing flows back to fc1
# until fc2 moves (fc2 itself gets a gradient at once); the "mul" gate has no zero init
# (with norm=True the SAM-channel BatchNorm before fc1 too)
ZERO_GRAD_AT_INIT = {"slca": r"slca\.\w+\.(fc1|norm)\.(weight|bias)"}


def _case_id(case) -> str:
    name, kw = case
    return "-".join([name, *(f"{k}={v}" for k, v in kw.items())])


def _inputs(net: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Image and SAM embeddings, or None for an input the model says it ignores."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, 64, 64, generator=g)
    sam = torch.randn(2, 256, 64, 64, generator=g)
    return (image if net.uses_image else None), (sam if net.uses_sam else None)


def _perturb(net: torch.nn.Module, seed: int) -> None:
    """Move every float parameter and buffer off its initial value (positive stays positive,
    so BatchNorm variances and the probe's std remain valid)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.mul_(1 + 0.2 * torch.rand(t.shape, generator=g)).add_(0.02 * torch.rand(t.shape, generator=g))


def _grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
            grads[name] = p.grad
    return grads


def _classifier_backward(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    net.train()
    image, sam = _inputs(net)
    logits = net(image, sam)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    return _grads(net)


@pytest.mark.parametrize("case", CLASSIFIER_CASES, ids=_case_id)
def test_classifier_forward_backward_and_gradients(case):
    name, kw = case
    torch.manual_seed(0)
    net = create_model(name, **CLASSIFIER_KW, **kw)
    assert sum(p.requires_grad for p in net.parameters()) > 0
    grads = _classifier_backward(net)
    zero = {n for n, g in grads.items() if not g.any()}
    pattern = ZERO_GRAD_AT_INIT.get(name) if kw.get("gate", "residual") == "residual" else None
    expected = {n for n in grads if pattern and re.fullmatch(pattern, n)}
    assert zero == expected
    if expected:  # exactly the gate's upstream, and only until the gate moves
        _perturb(net, seed=1)
        net.zero_grad()
        assert all(g.any() for g in _classifier_backward(net).values())


@pytest.mark.parametrize("case", CLASSIFIER_CASES, ids=_case_id)
def test_classifier_save_load_round_trip(case, tmp_path):
    """model.pt's recipe: registry name + constructor kwargs + state_dict, rebuilt by name."""
    name, kw = case
    torch.manual_seed(0)
    net = create_model(name.replace("_", "-"), **CLASSIFIER_KW, **kw)
    _perturb(net, seed=2)
    torch.save({"model": canonical(name), "model_kwargs": {**CLASSIFIER_KW, **kw},
                "state_dict": net.state_dict()}, tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.manual_seed(1)
    twin = create_model(saved["model"], **saved["model_kwargs"]).eval()
    net.eval()
    image, sam = _inputs(net, seed=3)
    with torch.no_grad():
        assert not torch.equal(twin(image, sam), net(image, sam))  # another init differs ...
        twin.load_state_dict(saved["state_dict"], strict=True)
        assert torch.equal(twin(image, sam), net(image, sam))  # ... until the weights load


# -- every segmentation head -----------------------------------------------------------


def _head_input(head: torch.nn.Module, grid: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Features (B,256,grid,grid) or, for image heads, the image on the 4x larger canvas."""
    g = torch.Generator().manual_seed(seed)
    if head.input_kind == "image":
        return torch.randn(batch, 3, 4 * grid, 4 * grid, generator=g)
    assert head.input_kind == "features"
    return torch.randn(batch, 256, grid, grid, generator=g)


@pytest.mark.parametrize("name", list_heads())
def test_head_backward_reaches_every_parameter(name):
    """Every trainable parameter of every head gets a non-zero gradient at initialisation
    (AutoSAM's zero-initialised no_mask_embed is an added bias, so it does too). The heads
    are fully convolutional, so a 16x16 grid keeps this fast; the full 64x64 -> 256x256
    shapes are tests/test_heads.py's test_output_shape_for_2_to_4_classes (over list_heads())."""
    torch.manual_seed(0)
    head = create_head(name, 3).train()
    y = head(_head_input(head, grid=16))
    assert y.shape == (2, 3, 64, 64)
    target = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(y, target).backward()
    grads = _grads(head)
    assert grads and [n for n, g in grads.items() if not g.any()] == []


@pytest.mark.parametrize("name", list_heads())
def test_head_save_load_round_trip(name, tmp_path):
    """segment model.pt's recipe: head name + num_classes + state_dict, rebuilt by name."""
    torch.manual_seed(0)
    head = create_head(name, 3)
    _perturb(head, seed=2)
    torch.save({"head": name, "num_classes": 3, "state_dict": head.state_dict()}, tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.manual_seed(1)
    twin = create_head(saved["head"], saved["num_classes"]).eval()
    head.eval()
    x = _head_input(head, grid=16, seed=3)
    with torch.no_grad():
        assert not torch.equal(twin(x), head(x))
        twin.load_state_dict(saved["state_dict"], strict=True)
        assert torch.equal(twin(x), head(x))


# -- every encoder ---------------------------------------------------------------------

# how each registered encoder is built here: "shipped" weights (no file needed), a tiny
# random-weight checkpoint (tests/tiny_sam.py, tiny_sam2.py), or "official": the name takes
# only the official architecture, whose multi-GB checkpoint tests cannot make, so the test
# checks that the builder reads the tiny SAM checkpoint and refuses it as not that size
ENCODER_CASES = {
    "litemedsam": "shipped", "sam": "tiny_sam",
    "vit_b": "official", "vit_l": "official", "vit_h": "official",
    "sam2_hiera_t": "tiny_sam2", "sam2_hiera_s": "tiny_sam2", "sam2_hiera_b+": "tiny_sam2", "sam2_hiera_l": "tiny_sam2",
}


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from tiny_sam import make_tiny_sam_checkpoint
    from tiny_sam2 import make_tiny_sam2_checkpoint

    d = tmp_path_factory.mktemp("registry_ckpt")
    return {"tiny_sam": make_tiny_sam_checkpoint(d / "tiny_sam.pth"),
            "tiny_sam2": make_tiny_sam2_checkpoint(d / "tiny_sam2.1.pt")}


def test_every_encoder_has_a_build_case():
    assert set(ENCODER_CASES) == set(list_encoders()), "add the new encoder to ENCODER_CASES"


@pytest.mark.parametrize("name", list_encoders())
def test_encoder_builds_by_name(name, tiny_checkpoints):
    case = ENCODER_CASES[name]
    if case == "official":
        with pytest.raises(EncoderError, match=rf"\(no official SAM size\), not {name}; use --encoder sam"):
            build_encoder(name, tiny_checkpoints["tiny_sam"])
        return
    enc = build_encoder(name, None if case == "shipped" else tiny_checkpoints[case])
    assert enc.name == name and enc.signature()["encoder"] == name
    assert not enc.net.training and not any(p.requires_grad for p in enc.net.parameters())
    image = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    with torch.no_grad():
        out = enc.forward(enc.prepare(image)[None])
    assert out.shape == (1, 256, 64, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()


# -- every dataset reader --------------------------------------------------------------

# the reader test in tests/test_datasets.py that covers each registered kind in depth
READER_TESTS = {
    "imagefolder": "test_imagefolder_classes_ids_and_loading",
    "csv": "test_csv_manifest",
    "medmnist": "test_medmnist_gray_compressed",
    "acdc-h5": "test_acdc_h5_layout",
    "synthetic": "test_synthetic_reader_masks_and_separable_classes",
}


def _imagefolder(root: Path) -> Path:
    for i, cls in enumerate(("a", "b")):
        reader_tests.png(root / cls / f"{i}.png", reader_tests.gray(i))
    return root


def _csv(root: Path) -> Path:
    reader_tests.png(root / "img" / "0.png", reader_tests.gray(0))
    reader_tests._manifest(root, "path,label\nimg/0.png,x\n")
    return root


def _medmnist(root: Path) -> Path:
    return reader_tests._npz(root / "pneumoniamnist.npz", **reader_tests._mnist())


def _acdc(root: Path) -> Path:
    reader_tests._acdc(root)
    return root


def _synthetic(root: Path) -> Path:
    from stages.datasets import make_synthetic

    return make_synthetic(root, n_per_class=1, size=32, seed=0)


# a minimal folder of each kind, to open it by name here
DATASET_ROOTS = {"imagefolder": _imagefolder, "csv": _csv, "medmnist": _medmnist, "acdc-h5": _acdc,
                 "synthetic": _synthetic}


def test_every_dataset_kind_has_a_reader_test_and_a_fixture():
    assert set(READER_TESTS) == set(DATASET_ROOTS) == set(list_datasets()), \
        "add the new kind to READER_TESTS and DATASET_ROOTS"
    for kind, test_name in READER_TESTS.items():
        source = inspect.getsource(getattr(reader_tests, test_name))
        assert f'open_dataset("{kind}"' in source, (kind, test_name)


@pytest.mark.parametrize("kind", list_datasets())
def test_dataset_opens_by_name(kind, tmp_path):
    root = DATASET_ROOTS[kind](tmp_path / "data")
    ds = open_dataset(kind.replace("-", "_"), root)  # either spelling
    assert ds.kind == kind and len(ds.samples) > 0
    image = ds.load_image(0)
    assert isinstance(image, np.ndarray) and image.ndim in (2, 3) and min(image.shape[:2]) >= 8
    with pytest.raises(DatasetError, match="unknown option"):
        open_dataset(kind, root, no_such_option=1)


def test_registries_read_like_the_dicts_they_replace():
    assert dict(ENCODERS.items())["sam"] is ENCODERS["sam"] and len(ENCODERS) == len(list_encoders())
    assert repr(HEADS) == "Registry('segmentation head': autosam, cnn, linear, unet)"
