#!/usr/bin/env bash
# One command for whoever has a GPU: CUDA-marked tests + stage-one GPU benchmark
# (ViT-B, random weights of the real size) + host-path figures, into one JSON:
#   bash benchmarks/gpu_check.sh            # -> $OUT/gpu_check.json (or ./gpu_check.json)
# Extra arguments go to benchmarks/gpu_check.py (--help). On a machine without CUDA it
# runs what a CPU can, says what it skipped, and still writes the JSON.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
# the whole check must fit in 8 minutes on a GPU host; stop it at 7.5 so the JSON of a
# partial run is never mistaken for a complete one (the script writes it only at the end)
exec timeout --signal=INT 450 "$py" "$here/gpu_check.py" "$@"
