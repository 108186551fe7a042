"""How far ``pipeline extract --resize fast`` (torch's antialiased uint8 bilinear) is from the
default resize (PIL's, ``SamPredictor``'s reference), on real images:

    python benchmarks/resize_difference.py                 # pixels + tiny random ViT, ~1 min on 2 cores
    python benchmarks/resize_difference.py --encoder vit_b --n-embed 4    # ViT-B-sized random weights (slow on CPU)

- pixels: over the images of each kind (../shared/datasets: blood_pbc RGB JPEGs, chest_xray
  gray JPEGs; both are upscaled to 1024), the fraction of the resized uint8 values that
  differ and the largest difference; also for each image tiled to a size the resize shrinks:
  1500x2000 (landscape 3:4, downscaled to 768x1024) and 2048x1000 (tall, to 1024x500: Pillow
  13 resizes such images vertically first, torch horizontally first);
- embeddings: the relative RMS difference between the embeddings of the two paths, per
  image (float32, a random-weight SAM ViT: ``tiny``, 2 blocks of width 64, or ViT-B's
  size), next to the float16 store's own rounding error of the same embeddings.

Section 7 of bench_extract.py calls ``pixel_difference`` and ``exact_vs_fast`` for its report.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
KINDS = {"rgb blood_pbc": SHARED / "blood_pbc" / "train", "gray chest_xray": SHARED / "chest_xray" / "train"}


def pixel_difference(images, size: int = 1024) -> dict[str, float]:
    """--resize fast vs the default on ``images`` (arrays, or a dataset with ``load_image``):
    the resized uint8 images' fraction of differing values, the largest difference, and how
    many images differ at all."""
    from stages.encoders.preprocess import resize_sam_u8

    differ = total = worst = count = 0
    items = [images.load_image(i) for i in range(len(images))] if hasattr(images, "load_image") else images
    for img in items:
        d = np.abs(resize_sam_u8(img, size, "fast").astype(np.int16) - resize_sam_u8(img, size).astype(np.int16))
        differ, total, worst = differ + int((d > 0).sum()), total + d.size, max(worst, int(d.max()))
        count += bool(d.any())
    return {"fraction_differing": differ / total, "max_difference": worst, "images_differing": count,
            "images": len(items)}


def exact_vs_fast(b) -> list[str]:
    """Section 7's summary at 1024 px: the default (PIL) resize and --resize fast side by side."""
    from benchmarks._hostpath import FAST_F32, FAST_U8, HOST_CORES
    from benchmarks._util import table

    rows = []
    for key, f in b.host_phases.items():
        if FAST_U8 not in f:
            continue
        c, e = b.host_ceilings, b.host_e2e[key]
        d = e["resize_fast_vs_exact"]
        rows.append([" ".join(key.split()[:2]) + " -> 1024",
                     f"{f['resize (uint8 canvas, GPU path)']:.2f} / {f[FAST_U8]:.2f}",
                     f"{f['resize+normalise (float32 canvas)']:.2f} / {f[FAST_F32]:.2f}",
                     f"{c[key + ' new']:.0f} / **{c[key + ' new-fast']:.0f}**",
                     f"{c[key + ' new-f32']:.0f} / {c[key + ' new-f32-fast']:.0f}",
                     f"{e['ceiling_img_s']:.0f} / {e['ceiling_img_s_resize_fast']:.0f}",
                     f"{100 * d['fraction_differing']:.4f}% / {d['max_difference']}"])
    if not rows:
        return []
    return ["### --resize exact (default, PIL) / --resize fast (torch), at 1024 px",
            table(rows, ["input", "resize, uint8 canvas (GPU path), core-ms",
                         "resize+normalise, float32 canvas (CPU path), core-ms",
                         f"projected {HOST_CORES}-core ceiling, GPU path, img/s", "same, float32 canvas",
                         "end to end here, img/s", "values differing / max"])]


def load(kind_dir: Path, n: int) -> list[np.ndarray]:
    """``n`` images spread over the classes, decoded as the imagefolder reader does."""
    from stages.datasets.imageio import read_image

    files = sorted(kind_dir.rglob("*.jp*g"))
    return [read_image(f) for f in files[:: max(1, len(files) // n)][:n]]


def tiled(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The image tiled to ``shape`` (real content at a size the SAM resize shrinks)."""
    reps = (-(-shape[0] // img.shape[0]), -(-shape[1] // img.shape[1])) + ((1,) if img.ndim == 3 else ())
    return np.ascontiguousarray(np.tile(img, reps)[: shape[0], : shape[1]])


def random_vit(kind: str) -> torch.nn.Module:
    """A random-weight SAM ViT image encoder (fused kernels): ``tiny`` or ViT-B's size."""
    from stages.encoders.fast import speed_up
    from stages.encoders.sam import OFFICIAL_ARCH, SamArch, build_vit

    torch.manual_seed(0)
    arch = SamArch(64, 2, 2, (1,)) if kind == "tiny" else SamArch(*OFFICIAL_ARCH["vit_b"])
    net = build_vit(arch).eval().requires_grad_(False)
    with torch.no_grad():  # positions random too (zero-initialised in SAM), so they take part
        for name, p in net.named_parameters():
            if "pos" in name:
                p.add_(torch.randn_like(p) * 0.5)
    speed_up(net)
    return net


@torch.inference_mode()
def embedding_difference(net: torch.nn.Module, images: list[np.ndarray]) -> dict[str, float]:
    """Per image: RMS(fast - exact) / RMS(exact) of the float32 embeddings, and the float16
    store's RMS rounding error of the exact embedding on the same scale."""
    from stages.encoders.preprocess import prepare_sam

    rel, fp16 = [], []
    for img in images:
        x_exact, x_fast = prepare_sam(img, 1024)[None], prepare_sam(img, 1024, "fast")[None]
        e = net(x_exact).double()
        # equal inputs give equal embeddings: one ViT-B forward is ~10-20 s on a small CPU
        f = e if torch.equal(x_exact, x_fast) else net(x_fast).double()
        rms = e.pow(2).mean().sqrt()
        rel.append(float((f - e).pow(2).mean().sqrt() / rms))
        fp16.append(float((e.half().double() - e).pow(2).mean().sqrt() / rms))
    return {"rel_rms_median": statistics.median(rel), "rel_rms_max": max(rel),
            "fp16_rounding_rel_rms_median": statistics.median(fp16), "images": len(images)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=96, help="images per kind for the pixel comparison")
    p.add_argument("--n-embed", type=int, default=8, help="images per kind for the embedding comparison")
    p.add_argument("--encoder", default="tiny", choices=["tiny", "vit_b"], help="random-weight SAM ViT size")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    net = random_vit(a.encoder)
    for kind, src in KINDS.items():
        if not src.is_dir():
            print(f"{kind}: {src} not found, skipped")
            continue
        imgs = load(src, a.n)
        shape = imgs[0].shape
        cases = [(f"{kind} {shape[0]}x{shape[1]}", imgs)]
        cases += [(f"{kind} tiled to {h}x{w}", [tiled(i, (h, w)) for i in imgs]) for h, w in ((1500, 2000), (2048, 1000))]
        for label, batch in cases:
            px = pixel_difference(batch)
            emb = embedding_difference(net, batch[: a.n_embed])
            print(f"{label}: pixels: {100 * px['fraction_differing']:.4f}% of values differ, max {px['max_difference']}, "
                  f"{px['images_differing']} of {px['images']} images differ; embeddings ({a.encoder} random ViT, "
                  f"{emb['images']} images): relative RMS difference median {emb['rel_rms_median']:.2e}, max "
                  f"{emb['rel_rms_max']:.2e}; float16 storage rounding {emb['fp16_rounding_rel_rms_median']:.2e}",
                  flush=True)


if __name__ == "__main__":
    main()
