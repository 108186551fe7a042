"""Shared helpers of the benchmark scripts: timing, medians, peak RSS, machine, tables, the
store of a ``pipeline compare`` folder, and the output paths they may write.

Results go to stdout, progress notes to stderr. The benchmarks follow the CLI's rule: they
write and delete only inside a scratch folder they made (``scratch_folder``) and replace a
result file only when it is one they wrote (``check_out_json``).
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]


def note(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (``sync`` runs before each stop, e.g.
    torch.cuda.synchronize)."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        out.append(time.perf_counter() - t)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """'median (min-max)' of seconds."""
    return f"{median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else f"{xs[0]:.2f} s"


_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)\n"
)


def peak_rss(cmd: Sequence[str], env: dict | None = None) -> tuple[int, float]:
    """(peak resident set size in bytes, wall seconds) of ``cmd`` run in a fresh process.

    The peak is the kernel's high-water mark (``ru_maxrss``) of the largest process the
    command started (the main process; DataLoader workers are separate and smaller),
    read in a wrapper process so earlier measurements cannot leak into it."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], capture_output=True, text=True, env=env,
                       cwd=REPO)
    wall = time.perf_counter() - t
    kib, code = r.stdout.split()[-2:]
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return int(kib) * 1024, wall


def self_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: str = "cpu") -> str:
    import torch

    parts = [f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), Python {platform.python_version()}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    try:
        load = os.getloadavg()[0]
        parts.append(f"load average {load:.1f} at start")
    except OSError:
        pass
    return "; ".join(parts)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets
GPU_BF16_PEAK_TFLOPS = {
    "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.0,
    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0,
}


def gpu_bf16_peak(name: str) -> float | None:
    for key, value in sorted(GPU_BF16_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value
    return None


def compare_store(folder: Path, dataset=None):
    """The ``Joined`` store and dataset of a ``pipeline compare --out`` folder, the dataset
    reopened from the store's provenance unless given (tests); exits with one line when
    ``folder`` is not such a folder."""
    import json

    from cache import FeatureStore
    from stages.common.joined import open_joined

    path = Path(folder) / "compare.json"
    if not path.is_file():
        sys.exit(f"error: {folder}: no compare.json; pass a `pipeline compare --out` folder")
    return open_joined(FeatureStore(json.loads(path.read_text())["store"]), dataset)


# a benchmark's scratch folder holds this file: fixed names inside it (codec.zarr, naive/,
# syn64/, raw files) are written and deleted from one run to the next
SCRATCH_MARK = ".bench-scratch"


def scratch_folder(path: str | os.PathLike | None, prefix: str) -> Path:
    """The folder a benchmark writes and deletes in: a new temporary folder when ``path`` is
    None, else ``path`` when absent, empty, or made here before (it holds ``SCRATCH_MARK``).
    Anything else (a file, a link, a folder of the user's) exits with one line before
    anything is written."""
    folder = Path(tempfile.mkdtemp(prefix=prefix) if path is None else path)
    mark = folder / SCRATCH_MARK
    if path is not None:
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            sys.exit(f"error: {folder}: not a folder; nothing was changed, pass a new or empty --work")
        if folder.exists() and any(folder.iterdir()) and (mark.is_symlink() or not mark.is_file()):
            sys.exit(f"error: {folder}: the folder is not empty and is no benchmark scratch folder (no "
                     f"{SCRATCH_MARK}); nothing was changed, pass a new or empty --work")
        folder.mkdir(parents=True, exist_ok=True)
    if not mark.exists():
        mark.write_text("scratch folder of the sam-feature-pipeline benchmarks, which write and delete in it\n")
    return folder


def check_out_json(path: str | os.PathLike, keys: Sequence[str], flag: str = "--out") -> Path:
    """``path`` as a result JSON to (re)write: absent, or a JSON object holding ``keys``
    (an earlier result of the same benchmark). Anything else, or a link, exits with one line
    before the benchmark runs."""
    from cache.ownership import is_json_with_keys

    p = Path(path)
    if p.is_symlink() or (p.exists() and not (p.is_file() and is_json_with_keys(p, keys))):
        sys.exit(f"error: {p}: exists and is not a result of this benchmark; nothing was changed, "
                 f"choose another {flag}")
    return p
