#!/usr/bin/env bash
# The prepared device check (bench/gpu_check.py), for a GPU machine with only torch and torchvision installed.
# Here, once:  python bench/gpu_check.py prepare     (Fashion-MNIST into bench/gpu-data/, git-ignored)
# There:       one device call, carry ["bench/gpu-data"], timeout_s 480, command "bash bench/gpu.sh"
# It writes $OUT/gpu_check.json (and the runs' trajectories) within BUDGET seconds; then, here:
#              python bench/gpu_check.py report <the folder it came back in>
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 bench/gpu_check.py run --out "${OUT:-gpu-check-out}" --device cuda --budget "${BUDGET:-360}"
