#!/usr/bin/env bash
# The GPU benchmark in one command: a 2-hour 1080p24 movie end to end (`vcn process`, finetuning
# included) with per-stage times, realtime factor, peak RSS and peak GPU memory, then the CPU/GPU
# agreement check for the default base model and for the dlib ResNet. Writes benchmarks/results/movie_gpu.{json,md},
# gpu_check.{json,md} and gpu_check_dlib.{json,md}.
#
# Needs the platform installed in the Python it runs (VCN_PYTHON, else .venv/bin/python, else python3:
# `bash .ci/setup` where a package index is reachable) and CUDA. The movie is a 10-minute edit of real
# footage encoded once and looped by stream copy to 120 minutes (see benchmarks/movie.py), so the
# whole command stays within 10 minutes on one H200 when the pipeline meets its target.
#
#   bash benchmarks/gpu.sh [MINUTES]      # default 120
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${VCN_PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python; } || PY=python3
MINUTES=${1:-120}
export PYTHONUNBUFFERED=1

"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: torch sees no CUDA GPU here; run benchmarks/movie.py for the CPU figures")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
import vcn, vcn_assets, dagster  # noqa: F401  (the platform is installed)
EOF

started=$(date +%s)
"$PY" benchmarks/movie.py --minutes "$MINUTES" --height 1080 --base-minutes 10
"$PY" benchmarks/gpu_check.py                                                  # the default base model (SFace)
"$PY" benchmarks/gpu_check.py --backbone dlib-resnet --name gpu_check_dlib
# Every backbone's GPU throughput and bf16/fp32 identity quality (needs the CelebA DEV crops beside the repository).
if [ -d ../shared/data/celeba-faces ]; then "$PY" benchmarks/embed.py --backbones --gpu-only; fi
echo "benchmarks/gpu.sh: done in $(( $(date +%s) - started )) s"
