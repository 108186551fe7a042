"""Segmentation heads: registry, output shapes, SAM-decoder initialisation, learning a toy mask."""
from __future__ import annotations

import pytest
import torch

from stages.models.heads import HEADS, create_head, list_heads
from stages.segment.losses import segmentation_loss
from stages.segment.metrics import dice_iou


# what each registered head reads; a new head must say so here
INPUT_KIND = {"autosam": "features", "cnn": "features", "linear": "features", "unet": "image"}
# learning rate of the toy-mask test for each head that reads features (the UNet reads images)
TOY_LR = {"autosam": 1e-3, "cnn": 5e-3, "linear": 5e-3}


def test_registry_lists_the_four_heads():
    assert list_heads() == ["autosam", "cnn", "linear", "unet"]
    assert set(HEADS) == {"autosam", "cnn", "linear", "unet"} == set(INPUT_KIND)
    assert set(TOY_LR) == {n for n in list_heads() if INPUT_KIND[n] == "features"}


@pytest.mark.parametrize("name", list_heads())
def test_output_shape_for_2_to_4_classes(name):
    torch.manual_seed(0)
    for c in (2, 3, 4):
        head = create_head(name, c).eval()
        x = torch.randn(1, 3, 256, 256) if head.input_kind == "image" else torch.randn(1, 256, 64, 64)
        with torch.no_grad():
            y = head(x)
        assert y.shape == (1, c, 256, 256)
        assert torch.isfinite(y).all()
    assert head.input_kind == INPUT_KIND[name]


def test_bad_names_and_class_counts_are_refused():
    with pytest.raises(ValueError, match="unknown segmentation head 'transunet'"):
        create_head("transunet", 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        create_head("cnn", 1)


def _sam_like_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A whole-SAM-shaped state dict (decoder + prompt encoder + one encoder tensor) with
    random values, as SAM's MaskDecoder/PromptEncoder name them."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(seed)
    dec = MaskDecoder(num_multimask_outputs=3, transformer_dim=256,
                      transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    pe = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16)
    state = {f"mask_decoder.{k}": v for k, v in dec.state_dict().items()}
    state.update({f"prompt_encoder.{k}": v for k, v in pe.state_dict().items()})
    state["image_encoder.neck.0.weight"] = torch.zeros(1)
    return state


@pytest.mark.parametrize("num_classes", [2, 6])
def test_autosam_initialises_from_a_sam_decoder(tmp_path, num_classes, capsys):
    state = _sam_like_state()
    path = tmp_path / "sam.pth"
    torch.save(state, path)
    torch.manual_seed(1)
    head = create_head("autosam", num_classes, checkpoint=path)
    own = head.state_dict()
    for k in ("transformer.layers.1.cross_attn_image_to_token.q_proj.weight", "output_upscaling.0.weight",
              "output_hypernetworks_mlps.1.layers.2.bias"):
        assert torch.equal(own[k], state[f"mask_decoder.{k}"])
    assert torch.equal(own["pe_layer.positional_encoding_gaussian_matrix"],
                       state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    assert torch.equal(own["no_mask_embed.weight"], state["prompt_encoder.no_mask_embed.weight"])
    # SAM's output tokens are not copied (they stall training); the class tokens start random
    n = min(num_classes, 4)
    assert not torch.equal(own["mask_tokens.weight"][:n], state["mask_decoder.mask_tokens.weight"][:n])
    if num_classes > 4:  # SAM has four mask tokens and MLPs; the other classes keep their random init
        assert not torch.equal(own["output_hypernetworks_mlps.4.layers.0.weight"],
                               state["mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"])
    report = head.init_from_sam(state)
    assert {"mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"} <= set(report["skipped"])
    assert "prompt_encoder.point_embeddings.0.weight" in report["skipped"]
    assert not any(k.startswith("image_encoder") for k in report["loaded"] + report["skipped"])
    assert "skipped" in capsys.readouterr().err


def test_autosam_refuses_a_checkpoint_without_decoder(tmp_path):
    from stages.encoders.base import EncoderError

    path = tmp_path / "enc.pth"
    torch.save({"image_encoder.x": torch.zeros(2)}, path)
    with pytest.raises(EncoderError, match="no mask_decoder"):
        create_head("autosam", 3, checkpoint=path)


def _toy_batch(n: int, seed: int, grid: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (n,256,grid,grid) whose channels 0..3 carry a square's indicator, and the
    square's (4*grid)^2 label (class 1 inside). The heads are fully convolutional (AutoSAM's
    positional encoding follows the grid), so a 16x16 grid keeps the test fast."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 256, grid, grid, generator=g) * 0.3
    y = torch.zeros(n, 4 * grid, 4 * grid, dtype=torch.int64)
    for i in range(n):
        r, c = torch.randint(1, grid // 2, (2,), generator=g).tolist()
        s = int(torch.randint(grid // 4, grid // 2, (1,), generator=g))
        x[i, :4, r:r + s, c:c + s] += 1.5
        y[i, 4 * r:4 * (r + s), 4 * c:4 * (c + s)] = 1
    return x, y


@pytest.mark.parametrize("name", [n for n in list_heads() if INPUT_KIND[n] == "features"])
def test_a_head_learns_a_toy_mask(name):
    lr = TOY_LR[name]
    torch.manual_seed(0)
    head = create_head(name, 2)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    x, y = _toy_batch(4, seed=0)
    for _ in range(30):
        loss, _ = segmentation_loss(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xv, yv = _toy_batch(8, seed=1)  # unseen squares
    head.eval()
    with torch.no_grad():
        pred = head(xv).argmax(1)
    dice, _ = dice_iou(pred.numpy() == 1, yv.numpy() == 1)
    assert dice > 0.9, dice
