"""Stage-two networks: the SLCA block, the timm classifier with SLCA hooks, the SAM-only
models and the registry."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch

from stages.models import SLCA, LinearProbe, create_model, list_models
from stages.models.classifier import resolve_stages

TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def _sam(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 256, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_the_four_models_and_refuses_unknown_names():
    assert {"slca", "backbone", "sam_head", "probe"} <= set(list_models())
    assert create_model("sam-head", num_classes=3)(None, _sam()).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")


def test_slca_residual_gate_is_identity_at_init_and_learns():
    x = torch.randn(2, 32, 16, 16)
    block = SLCA(32, window=8)
    assert torch.equal(block(x, _sam()), x)
    # the zero-initialised last conv gets a gradient at once, so training leaves the identity
    block(x, _sam()).square().sum().backward()
    assert block.fc2.weight.grad.abs().sum() > 0
    with torch.no_grad():
        block.fc2.weight.normal_(0, 1.0)
    y = block(x, _sam())
    assert y.shape == x.shape and not torch.allclose(y, x)
    ratio = y / x
    assert ((ratio > 0) & (ratio < 2)).all()  # 1 + (2a - 1) with a in (0, 1)


def test_slca_gate_is_local_to_its_window():
    """Changing the SAM embeddings inside one 8x8 window changes the gate only there
    (global pooling, window 0, would change it everywhere)."""
    sam = _sam(1)
    bumped = sam.clone()
    bumped[:, :, 0:8, 0:8] += 3.0  # window (0,0) of the 8x8 window grid
    block = SLCA(16, window=8, gate="mul")
    a, b = block.attention(sam), block.attention(bumped)
    assert a.shape == (1, 16, 8, 8)
    changed = (a - b).abs().amax(dim=1)[0] > 1e-6
    assert changed[0, 0] and changed.sum() == 1
    glob = SLCA(16, window=0, gate="mul")
    assert glob.attention(sam).shape == (1, 16, 1, 1)


def test_slca_mul_gate_and_channels_last_match():
    block = SLCA(8, window=4, gate="mul")
    x = torch.randn(2, 8, 10, 10)
    sam = _sam()
    y = block(x, sam)
    assert y.shape == x.shape and (y.abs() <= x.abs() + 1e-6).all()  # sigmoid in (0,1)
    y_nhwc = block(x.permute(0, 2, 3, 1), sam, channels_last=True)
    torch.testing.assert_close(y_nhwc.permute(0, 3, 1, 2), y)
    with pytest.raises(ValueError, match="gate"):
        SLCA(8, gate="add")


def test_slca_spatial_map_and_additive_fusion_start_as_identity_then_act():
    """spatial: one factor per window for all channels; add: a per-window shift. Both
    start at zero (identity), both get a gradient at once, channels_last agrees."""
    x, sam = torch.randn(2, 8, 16, 16), _sam()
    block = SLCA(8, window=8, spatial=True, add=True)
    assert torch.equal(block(x, sam), x)
    block(x, sam).square().sum().backward()
    assert block.spatial.weight.grad.abs().sum() > 0 and block.inject.weight.grad.abs().sum() > 0
    spatial = SLCA(8, window=8, spatial=True)
    with torch.no_grad():
        spatial.spatial.weight.normal_(0, 1.0)
        spatial.spatial.bias.fill_(0.5)
    g = spatial.gate_map(sam, (8, 8))  # fc2 still zero: the channel gate is 1
    assert torch.allclose(g, g[:, :1].expand_as(g)) and not torch.allclose(g, torch.ones_like(g))
    fused = SLCA(8, window=8, add=True)
    with torch.no_grad():
        fused.inject.bias.fill_(0.25)
    torch.testing.assert_close(fused(x, sam), x + 0.25)
    y = fused(x.permute(0, 2, 3, 1), sam, channels_last=True)
    torch.testing.assert_close(y.permute(0, 3, 1, 2), x + 0.25)


def test_resolve_stages_specs():
    info = timm.create_model("resnet10t").feature_info
    names = [d["module"] for d in info]
    assert [names[i] for i in resolve_stages(info, "all")] == ["layer1", "layer2", "layer3", "layer4"]
    assert [names[i] for i in resolve_stages(info, "last2")] == ["layer3", "layer4"]
    assert [names[i] for i in resolve_stages(info, "-1,layer2")] == ["layer2", "layer4"]
    with pytest.raises(ValueError, match="unknown SLCA stage 'layer9'"):
        resolve_stages(info, "layer9")
    with pytest.raises(ValueError, match="out of range"):
        resolve_stages(info, [7])


def test_slca_classifier_equals_backbone_at_init_and_differs_once_the_gate_moves():
    torch.manual_seed(0)
    net = create_model("slca", backbone="resnet10t", num_classes=3, img_size=32).eval()
    base = create_model("backbone", backbone="resnet10t", num_classes=3, img_size=32).eval()
    missing = base.load_state_dict({k: v for k, v in net.state_dict().items() if k.startswith("net.")})
    assert not missing.missing_keys
    x, sam = torch.randn(2, 3, 32, 32), _sam()
    assert net.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    torch.testing.assert_close(net(x, sam), base(x))
    with torch.no_grad():
        for block in net.slca.values():
            block.fc2.weight.normal_(0, 1.0)
    assert not torch.allclose(net(x, sam), base(x))
    # deepcopy re-points the hooks at the copy
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for block in twin.slca.values():
            block.fc2.weight.zero_()
    torch.testing.assert_close(twin(x, sam), base(x))
    assert not torch.allclose(net(x, sam), base(x))
    maps = net.attention_maps(sam)
    assert list(maps) == net.stage_names and maps["layer3"].shape == (2, 8, 8)
    with pytest.raises(RuntimeError, match="SAM embeddings"):
        net(x)


def test_slca_on_swin_v2_token_maps():
    net = create_model("slca", backbone="swinv2_tiny_window8_256", num_classes=2, img_size=64,
                       stages="last2", backbone_kwargs=TINY_SWIN)
    assert net.channels_last and net.stage_names == ["layers.2", "layers.3"]
    with torch.no_grad():
        for block in net.slca.values():
            block.fc2.weight.normal_(0, 1.0)
    x, sam = torch.randn(2, 3, 64, 64), _sam()
    logits = net(x, sam)
    assert logits.shape == (2, 2)
    logits.sum().backward()
    assert all(b.fc1.weight.grad is not None for b in net.slca.values())


def test_unknown_backbone_and_checkpoint_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown timm backbone"):
        create_model("slca", backbone="resnet_nope")
    src = timm.create_model("resnet10t", num_classes=5)
    torch.save(src.state_dict(), tmp_path / "r10t.pth")
    net = create_model("slca", backbone="resnet10t", num_classes=2, img_size=32)
    loaded, skipped = net.load_backbone(tmp_path / "r10t.pth")
    assert skipped == 2 and loaded > 50  # fc.weight / fc.bias have another class count
    torch.testing.assert_close(net.net.conv1[0].weight, src.conv1[0].weight)
    torch.save(timm.create_model("convnext_atto").state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="another architecture"):
        net.load_backbone(tmp_path / "other.pth")


@pytest.mark.parametrize("k", [2, 3])
def test_linear_probe_reproduces_sklearn(k):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    sam = torch.from_numpy(rng.normal(size=(30, 256, 4, 4)).astype(np.float32))
    y = np.arange(30) % k
    sam[:, :4] += torch.from_numpy(y.astype(np.float32))[:, None, None, None]
    x = sam.mean(dim=(2, 3)).double().numpy()
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(max_iter=2000).fit(scaler.transform(x), y)
    probe = create_model("probe", num_classes=k)
    assert isinstance(probe, LinearProbe)
    probe.set_from_sklearn(scaler, lr)
    got = torch.softmax(probe(None, sam), dim=1).detach().numpy()
    np.testing.assert_allclose(got, lr.predict_proba(scaler.transform(x)), atol=1e-5)


def test_slca_fuse_adds_a_linear_read_of_the_pooled_sam_descriptor():
    """fuse: logits = backbone-with-SLCA logits + Linear(LayerNorm(mean_hw(sam)))."""
    torch.manual_seed(0)
    net = create_model("slca", backbone="resnet10t", num_classes=3, img_size=32, fuse=True).eval()
    plain = create_model("slca", backbone="resnet10t", num_classes=3, img_size=32).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fuse.")})
    x, sam = torch.randn(2, 3, 32, 32), _sam()
    extra = net.fuse[1](torch.nn.functional.layer_norm(sam.mean(dim=(2, 3)), (256,)))
    torch.testing.assert_close(net(x, sam), plain(x, sam) + extra)
    # the descriptor term depends on the SAM features alone, not on the image
    y = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(y, sam) - plain(y, sam), extra)
    assert create_model("backbone", backbone="resnet10t", num_classes=3, img_size=32, fuse=True).fuse is None


def test_gate_statistics_show_the_identity_at_init_and_the_spread_once_trained(tmp_path):
    from stages.classify.plots import gate_stats, plot_attention

    torch.manual_seed(0)
    net = create_model("slca", backbone="resnet10t", num_classes=3, img_size=32).eval()
    sam = _sam()
    gates = {k: v.numpy() for k, v in net.gates(sam).items()}
    assert list(gates) == net.stage_names
    assert all(g.ndim == 4 and g.shape[0] == 2 for g in gates.values())  # (B,C,g,g)
    at_init = gate_stats(gates)
    for s in at_init.values():  # the residual gate starts as exactly the identity
        assert s["min"] == s["max"] == 1.0 and s["channel_std"] == 0.0 and s["max_abs_dev"] == 0.0
    with torch.no_grad():
        for block in net.slca.values():
            block.fc2.weight.normal_(0, 0.05)
    moved = {k: v.numpy() for k, v in net.gates(sam).items()}
    stats = gate_stats(moved)
    for stage, s in stats.items():
        g = moved[stage]
        assert s["min"] == pytest.approx(float(g.min())) and s["max"] == pytest.approx(float(g.max()))
        assert s["channel_std"] == pytest.approx(float(g.std(axis=1).mean()), rel=1e-6) and s["channel_std"] > 0
        assert s["max_abs_dev"] == pytest.approx(float(abs(g - 1).max())) and 0 < s["max_abs_dev"] < 1
        np.testing.assert_allclose(net.attention_maps(sam)[stage].numpy(), g.mean(axis=1), rtol=1e-6)
    png = plot_attention(np.random.default_rng(0).random((2, 32, 32)), moved, ["a", "b"], tmp_path / "att.png")
    assert png.stat().st_size > 5000


def test_slca_prior_adds_the_frozen_probe_logits():
    """prior: logits = the network's own + the probe's (a frozen LinearProbe): no gradient
    reaches it, so training learns what the probe misses."""
    torch.manual_seed(0)
    net = create_model("slca", backbone="resnet10t", num_classes=3, img_size=32, prior=True).eval()
    plain = create_model("slca", backbone="resnet10t", num_classes=3, img_size=32).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("prior.")})
    with torch.no_grad():
        net.prior.fc.weight.normal_()
        net.prior.mean.fill_(0.1)
    x, sam = torch.randn(2, 3, 32, 32), _sam()
    torch.testing.assert_close(net(x, sam), plain(x, sam) + net.prior(None, sam))
    net.prior_weight = 0.5  # blending: the prior at a weight chosen after training
    torch.testing.assert_close(net(x, sam), plain(x, sam) + 0.5 * net.prior(None, sam))
    net.prior_weight = 0.0
    torch.testing.assert_close(net(x, sam), plain(x, sam))
    net.prior_weight = 1.0
    assert not any(p.requires_grad for p in net.prior.parameters())
    net.train()(x, sam).sum().backward()
    assert net.prior.fc.weight.grad is None and net.net.fc.weight.grad is not None
    assert {"prior.mean", "prior.std", "prior.fc.weight"} <= set(net.state_dict())  # saved in model.pt
    assert create_model("backbone", backbone="resnet10t", num_classes=3, img_size=32, prior=True).prior is None


def test_slca_distill_loss_is_the_last_stage_predicting_the_pooled_sam_features():
    torch.manual_seed(0)
    net = create_model("slca", backbone="resnet10t", num_classes=3, img_size=32, distill=True).eval()
    x, sam = torch.randn(4, 3, 32, 32), _sam(4)
    stage = {}
    net.net.layer4.register_forward_hook(lambda m, i, o: stage.update(out=o))
    logits, aux = net(x, sam, aux=True)
    loss = aux["distill"]
    assert net._stage_out is None  # nothing of the forward is kept on the module
    torch.testing.assert_close(logits, net(x, sam))  # asking for the loss changes no logit
    pred = net.distill(stage["out"])  # the stage's own output, before its gate
    t = torch.nn.functional.adaptive_avg_pool2d(sam, pred.shape[2:])
    t = (t - t.mean(dim=(0, 2, 3), keepdim=True)) / t.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, t))
    loss.backward()
    assert net.distill.weight.grad.abs().sum() > 0 and net.net.conv1[0].weight.grad.abs().sum() > 0  # reaches the stem
    net.train()
    start = net(x, sam, aux=True)[1]["distill"].detach()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(20):  # the backbone can learn the SAM features of a fixed batch
        opt.zero_grad()
        net(x, sam, aux=True)[1]["distill"].backward()
        opt.step()
    assert net(x, sam, aux=True)[1]["distill"] < 0.5 * start
    plain = create_model("slca", backbone="resnet10t", num_classes=3, img_size=32)
    assert plain.distill is None and not any(k.startswith("distill") for k in plain.state_dict())
    assert net(x, sam, aux=True)[1].keys() == {"image", "distill"} and plain(x, sam, aux=True)[1].keys() == {"image"}


def test_slca_aux_returns_the_branch_logits_that_the_total_adds():
    torch.manual_seed(0)
    net = create_model("slca", backbone="resnet10t", num_classes=3, img_size=32, branch=True).eval()
    x, sam = torch.randn(4, 3, 32, 32), _sam(4)
    logits, aux = net(x, sam, aux=True)
    assert aux.keys() == {"image", "branch"}
    torch.testing.assert_close(aux["branch"], net.branch(None, sam))
    torch.testing.assert_close(logits - aux["branch"], net.forward_head(net.forward_features(x, sam)))
    torch.nn.functional.cross_entropy(aux["branch"], torch.tensor([0, 1, 2, 0])).backward()
    assert net.branch.fc.weight.grad.abs().sum() > 0 and net.net.fc.weight.grad is None  # the branch alone


def test_slca_aux_image_is_the_image_part_alone():
    torch.manual_seed(0)
    net = create_model("slca", backbone="resnet10t", num_classes=3, img_size=32, branch=True, prior=True,
                       prior_weight=0.5, fuse=True).eval()
    x, sam = torch.randn(2, 3, 32, 32), _sam(2)
    logits, aux = net(x, sam, aux=True)
    # the sum is the image part (backbone and fuse), the branch and the weighted prior
    torch.testing.assert_close(logits, aux["image"] + aux["branch"] + 0.5 * net.prior(None, sam))
    torch.testing.assert_close(aux["image"], net.forward_head(net.forward_features(x, sam))
                               + net.fuse(sam.mean(dim=(2, 3))))


def test_slca_branch_detach_stops_the_summed_loss_at_the_branch_only():
    torch.manual_seed(0)
    kw = dict(backbone="resnet10t", num_classes=3, img_size=32, branch=True)
    joint, detached = create_model("slca", **kw), create_model("slca", **kw, branch_detach=True)
    detached.load_state_dict(joint.state_dict())
    x, sam, y = torch.randn(4, 3, 32, 32), _sam(4), torch.tensor([0, 1, 2, 0])
    for net in (joint, detached):
        net.eval()
        torch.nn.functional.cross_entropy(net(x, sam), y).backward()
    torch.testing.assert_close(joint(x, sam), detached(x, sam))  # the same answer at inference
    assert joint.branch.fc.weight.grad.abs().sum() > 0 and detached.branch.fc.weight.grad is None
    torch.testing.assert_close(detached.net.fc.weight.grad, joint.net.fc.weight.grad)  # the image part as before
    logits, aux = detached(x, sam, aux=True)
    torch.nn.functional.cross_entropy(aux["branch"], y).backward()  # its own loss still reaches it
    assert detached.branch.fc.weight.grad.abs().sum() > 0
