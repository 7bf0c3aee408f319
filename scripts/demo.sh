#!/usr/bin/env bash
# The main job: compress the pretrained MobileNetV2 and time it against the original (arguments go to
# `fxcompress demo`, e.g. --lowering inductor --batch 8).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fxcompress demo "$@"
