"""Pretrained backbones the timm way: ``--backbone-weights PATH`` through timm's own
pretrained loader (``pretrained_cfg_overlay=dict(file=...)``), ``--pretrained`` through
timm's Hugging Face hub download (here only ever from a prepared local cache, offline),
SLCA's identity at init on a pretrained backbone, and the one-line offline error.

Nothing here touches the network: every subprocess runs with HF_HUB_OFFLINE=1 and HF_HOME /
TORCH_HOME in a temporary folder (huggingface_hub reads both at import, hence subprocesses)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from stages.common.training import load_checkpoint
from stages.models import create_model

HUB_ID = timm.models.get_pretrained_cfg("resnet18").hf_hub_id  # timm/resnet18.a1_in1k


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory) -> Path:
    """A resnet18 state dict (1000 classes, like timm's ImageNet weights) with seeded random
    values and non-trivial BatchNorm statistics, so that "loaded" is distinguishable from init."""
    torch.manual_seed(123)
    src = timm.create_model("resnet18")
    with torch.no_grad():
        for name, buf in src.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "resnet18_in1k.pth"
    torch.save(src.state_dict(), path)
    return path


def _offline_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1", TORCH_HOME=str(home / "torch"))
    return env


def _backbone_tensors_equal(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = net.state_dict()
    body = [k for k in state if not k.startswith("fc.")]
    assert body and all(k in own for k in body)
    for k in body:
        assert torch.equal(own[k], state[k]), k


def test_backbone_weights_load_through_timms_pretrained_loader(r18_file):
    net = create_model("slca", backbone="resnet18", num_classes=2, img_size=64, pretrained=str(r18_file))
    assert net.net.pretrained_cfg["file"] == str(r18_file)  # timm's loader, not ours
    state = torch.load(r18_file, weights_only=True)
    _backbone_tensors_equal(net.net, state)
    # timm re-initialises the classifier for 2 classes instead of failing on the shape
    assert net.net.fc.weight.shape == (2, 512)
    random = create_model("slca", backbone="resnet18", num_classes=2, img_size=64)
    assert not torch.equal(random.net.conv1.weight, net.net.conv1.weight)


def test_slca_is_the_identity_at_init_on_a_pretrained_backbone(r18_file):
    torch.manual_seed(0)
    slca = create_model("slca", backbone="resnet18", num_classes=2, img_size=64, pretrained=str(r18_file)).eval()
    torch.manual_seed(0)
    plain = create_model("backbone", backbone="resnet18", num_classes=2, img_size=64, pretrained=str(r18_file)).eval()
    assert torch.equal(slca.net.fc.weight, plain.net.fc.weight) and len(slca.slca) == 4
    x, sam = torch.randn(2, 3, 64, 64), torch.randn(2, 256, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(slca(x, sam), plain(x), rtol=0, atol=1e-6)
        for block in slca.slca.values():  # the comparison above can fail: a moved gate changes the output
            block.fc2.weight.normal_(0, 0.5)
        assert (slca(x, sam) - plain(x)).abs().max() > 1e-3


def test_unusable_weight_files_are_refused_in_one_line(tmp_path):
    other = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto").state_dict(), other)
    for k in (2, 1000):  # timm loads non-strictly only when it re-initialises the classifier
        with pytest.raises(ValueError, match="not a checkpoint of backbone resnet18") as e:
            create_model("backbone", backbone="resnet18", num_classes=k, img_size=64, pretrained=str(other))
        assert "\n" not in str(e.value)
    r34 = tmp_path / "r34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), r34)
    with pytest.raises(ValueError, match=r"layer1.0.conv1.weight has shape \(64, 64, 3, 3\)"):
        create_model("backbone", backbone="resnet50", num_classes=2, img_size=64, pretrained=str(r34))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read backbone weights"):
        create_model("backbone", backbone="resnet18", num_classes=2, img_size=64, pretrained=str(junk))
    with pytest.raises(FileNotFoundError, match="backbone weights not found"):
        create_model("backbone", backbone="resnet18", num_classes=2, img_size=64, pretrained=str(tmp_path / "no"))


def _hub_cache(home: Path, r18_file: Path) -> Path:
    """The Hugging Face cache layout huggingface_hub reads offline: refs/main -> a snapshot."""
    from safetensors.torch import save_file

    repo = home / "hf" / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(torch.load(r18_file, weights_only=True), str(snap / "model.safetensors"))
    return snap / "model.safetensors"


def test_pretrained_reads_the_hugging_face_cache_offline(r18_file, tmp_path):
    """``pretrained=True`` goes through timm's hub download, which finds the cached file."""
    cached = _hub_cache(tmp_path, r18_file)
    script = (
        "import sys, torch; from safetensors.torch import load_file; from stages.models import create_model\n"
        "from stages.models.classifier import check_hub_weights; check_hub_weights('resnet18')\n"
        "net = create_model('backbone', backbone='resnet18', num_classes=3, img_size=64, pretrained=True)\n"
        "ref = load_file(sys.argv[1]); own = net.net.state_dict()\n"
        "bad = [k for k in ref if not k.startswith('fc.') and not torch.equal(own[k], ref[k])]\n"
        "print('loaded', len(ref), 'differ', len(bad), 'fc', tuple(own['fc.weight'].shape))\n")
    r = subprocess.run([sys.executable, "-c", script, str(cached)], env=_offline_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "loaded 122 differ 0 fc (3, 512)" in r.stdout


def test_pretrained_offline_and_not_cached_is_one_line_naming_backbone_weights(tmp_path):
    """Checked before the store is even opened (it need not exist) or anything is written."""
    out, store = tmp_path / "run", tmp_path / "any.zarr"
    cli = Path(sys.executable).with_name("pipeline")
    r = subprocess.run([str(cli), "train", "--from-cache", str(store), "--model", "slca", "--pretrained",
                        "--out", str(out), "-q"], env=_offline_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: backbone resnet18:"), r.stderr
    assert "HF_HUB_OFFLINE" in lines[0] and "--backbone-weights PATH" in lines[0]
    assert str(tmp_path / "hf" / "hub") in lines[0]  # names the cache it looked in
    assert not out.exists()  # refused before anything was written


@pytest.mark.slow
def test_cli_trains_from_a_weights_file_and_the_model_reloads_without_it(synthetic_store, r18_file, tmp_path):
    """A model trained from pretrained weights is rebuilt with random init and its own trained
    weights: evaluate needs neither the file nor the hub."""
    import shutil

    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    weights = tmp_path / "r18.pth"
    shutil.copy(r18_file, weights)
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--from-cache", str(synthetic_store), "--model", "slca", "--backbone-weights",
                            str(weights), "--epochs", "1", "--precise-bn", "0", "--workers", "0", "--no-plots",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"pretrained weights from {weights}" in r.output
    saved = load_checkpoint(out / "model.pt")
    assert "pretrained" not in saved["model_kwargs"] and saved["config"]["backbone_weights"] == str(weights)
    weights.unlink()
    r = runner.invoke(app, ["evaluate", str(out / "model.pt"), "--json", "-q"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    (["--task", "segment", "--head", "linear", "--pretrained"], "--pretrained: not an option of --task segment"),
    (["--model", "probe", "--pretrained"], "--model probe has no timm backbone"),
    (["--model", "slca", "--pretrained", "--backbone-weights", "w.pth"], "both given"),
    (["--model", "slca", "--backbone", "nope_net", "--pretrained"], "unknown timm backbone 'nope_net'"),
])
def test_cli_refuses_pretrained_where_it_cannot_apply(tmp_path, args, message):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "run"  # refused before the store is opened: it need not exist
    r = CliRunner().invoke(app, ["train", "--from-cache", str(tmp_path / "any.zarr"), "--out", str(out), "-q", *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not out.exists()
