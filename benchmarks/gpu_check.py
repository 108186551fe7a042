"""The one GPU check (run through benchmarks/gpu_check.sh): CUDA-marked tests, then
bench_extract.py's sections 1-2 (ViT-B, random weights of the real size, bf16) and 7
(the host path, with the default resize and ``--resize fast`` side by side:
``host_resize_exact_vs_fast``) on the GPU, all written to one JSON file.

    bash benchmarks/gpu_check.sh                 # writes $OUT/gpu_check.json, else ./gpu_check.json

Without CUDA it still runs: the CUDA tests are reported skipped (pytest says why), the GPU
benchmark is skipped with a message, the host-path section runs on the CPU (figures for
the projection), and the JSON says which parts ran. Budget: under 8 minutes on a GPU host.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what marks an earlier gpu_check.json, which --out may replace
RESULT_KEYS = ("cuda", "gpu", "cpu", "cores", "torch")
sys.path.insert(0, str(ROOT))


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def run_tests(paths: list[str], timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", *paths]
    say("CUDA-marked tests: " + " ".join(cmd[1:]))
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), 124
    tail = out.strip().splitlines()[-12:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error|errors)", out)}
    sys.stderr.write("\n".join(tail) + "\n")
    # pytest exits 5 when every selected test was skipped/deselected: fine on a CPU
    ok = rc == 0 or (rc == 5 and not counts.get("failed"))
    return {"cmd": " ".join(cmd[1:]), "rc": rc, "ok": ok, "counts": counts, "tail": tail,
            "seconds": round(time.perf_counter() - t, 1)}


def run_bench(args, cuda: bool) -> dict:
    import torch

    from benchmarks import _hostpath
    from benchmarks.bench_extract import Bench, parse_args

    gpu_bench = cuda and not args.skip_gpu_bench
    # without the GPU benchmark, no random ViT-B checkpoint is made (seconds, 375 MB)
    bench_args = ["--device", "cuda" if cuda else "cpu", "--encoder", args.encoder if gpu_bench else "litemedsam",
                  "--n", str(args.n), "--repeats", str(args.repeats), "--host-n", str(args.host_n),
                  "--work", str(args.work)]
    b = Bench(parse_args(bench_args))
    out: dict = {"bench_args": bench_args}
    if cuda and not gpu_bench:
        out["skipped"] = "--skip-gpu-bench: GPU benchmark not run"
    elif cuda:
        torch.cuda.reset_peak_memory_stats()
        say(f"bench_extract sections 1-2 on {torch.cuda.get_device_name()}: {args.encoder}, {args.n} images")
        b.extraction()
        out["extraction"] = b.figures
        out["images_per_s"] = b.figures["extract_img_s"]
        out["fraction_of_bf16_peak"] = b.figures.get("extract_fraction_of_bf16_peak")
        out["compute_fraction_of_bf16_peak"] = b.figures.get("compute_fraction_of_bf16_peak")
        out["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["report_1_2"] = b.report()
    else:
        say("no CUDA device (torch.cuda.is_available() is false): skipping the GPU benchmark "
            "(sections 1-2 on cuda); the host-path section runs on the CPU")
        out["skipped"] = "no CUDA device: GPU benchmark not run"
    if args.host_n > 0:
        sizes = (1024, 256) if cuda else (1024,)
        say(f"bench_extract section 7 (host path) at {sizes}, {args.host_n} images per kind")
        out["report_7"] = _hostpath.section(b, sizes=sizes)
        out["host_phases_core_ms"] = b.host_phases
        out["host_projected_ceilings_img_s"] = b.host_ceilings
        out["host_end_to_end"] = b.host_e2e
        out["host_resize_exact_vs_fast"] = resize_summary(b)
        print(out["report_7"])
    return out


def resize_summary(b) -> dict:
    """Section 7 at 1024 px, the default resize (PIL) and ``--resize fast`` as [exact, fast]
    pairs: resize core-ms (uint8 canvas), projected ceiling, end to end on this host."""
    from benchmarks._hostpath import FAST_U8

    out = {}
    for key, ph in b.host_phases.items():
        if FAST_U8 in ph:
            e = b.host_e2e[key]
            out[key] = {"resize_core_ms": [ph["resize (uint8 canvas, GPU path)"], ph[FAST_U8]],
                        "projected_ceiling_img_s": [b.host_ceilings[f"{key} new"], b.host_ceilings[f"{key} new-fast"]],
                        "end_to_end_img_s": [e["ceiling_img_s"], e["ceiling_img_s_resize_fast"]],
                        "pixels_fast_vs_exact": e["resize_fast_vs_exact"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    p.add_argument("--encoder", default="vit_b")
    p.add_argument("--n", type=int, default=256, help="images for sections 1-2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--host-n", type=int, default=96, help="section 7 images per kind (0: skip section 7)")
    p.add_argument("--tests", default="tests", help="where pytest looks for CUDA-marked tests")
    p.add_argument("--test-timeout", type=int, default=180)
    p.add_argument("--work", default=None, help="scratch folder (default: a new temp dir)")
    p.add_argument("--skip-gpu-bench", action="store_true", help="do not run sections 1-2 even with CUDA")
    args = p.parse_args(argv)
    import torch

    from benchmarks._util import check_out_json, cpu_name, scratch_folder

    # both refused before the tests run, not after minutes of them
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path.cwd()
    path = check_out_json(Path(args.out) if args.out else out_dir / "gpu_check.json", RESULT_KEYS)
    args.work = scratch_folder(args.work, "gpu_check_")
    cuda = torch.cuda.is_available()

    t0 = time.perf_counter()
    result: dict = {"cuda": cuda, "gpu": torch.cuda.get_device_name() if cuda else None, "cpu": cpu_name(),
                    "cores": os.cpu_count(), "torch": torch.__version__}
    if not cuda:
        say("no CUDA device: the CUDA-marked tests will be skipped (pytest prints the reason)")
    def write(complete: bool) -> None:  # after each part: a run stopped half-way still reports
        result["complete"] = complete
        result["seconds"] = round(time.perf_counter() - t0, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))

    try:
        result["tests"] = run_tests(args.tests.split(","), args.test_timeout)
        write(False)
        try:
            result["bench"] = run_bench(args, cuda)
        except Exception as e:  # the JSON still says what ran and what broke
            result["bench"] = {"error": f"{type(e).__name__}: {e}"}
            say(f"benchmark failed: {type(e).__name__}: {e}")
    except KeyboardInterrupt:  # gpu_check.sh's time limit
        result["interrupted"] = "stopped at the time limit"
        write(False)
        say(f"stopped at the time limit; partial results in {path}")
        return 1
    write(True)
    say(f"wrote {path} ({result['seconds']} s)")
    return 0 if result["tests"]["ok"] and "error" not in result["bench"] else 1


if __name__ == "__main__":
    sys.exit(main())
