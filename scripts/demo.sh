#!/usr/bin/env bash
# The main job: the pretrained MobileNetV2, fine-tuned on Fashion-MNIST and made shallower and faster by the one-shot
# selection (weights and plan committed by bench/oneshot_fashion.py), against a control trained as long: activations,
# weight layers, MACs, test accuracy on the 10k test images, batch-1 latency on ONNX Runtime. A few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python bench/oneshot_fashion.py demo
