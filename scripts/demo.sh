#!/usr/bin/env bash
# The main job: the pretrained MobileNetV2, fine-tuned on Fashion-MNIST and made shallower by the fine-tuning
# loop (weights and plan committed by bench/prune_fashion.py), against the dense model: activations, weight
# layers, test accuracy on the 10k test images, batch-1 latency on ONNX Runtime. A few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python bench/prune_fashion.py demo
