#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and the Fashion-MNIST files.
# Usage: scripts/setup.sh            -> environment only
#        source-free: the venv lives in .venv at the repository root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HANT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.hant-installed"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi

# Reinstall when pyproject.toml changed since the last install.
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "[setup] installing torch 2.14.1 / torchvision 0.29.1 and hant (first time: a few minutes)"
    # The exact versions this kind of machine holds on local disk; users elsewhere may use any torch>=2.1.
    "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
    "$VENV/bin/pip" install -q -e "$ROOT[dev,bench]"  # bench: Torch-Pruning, for bench/headline.py and its test
    touch "$STAMP"
fi

# Fashion-MNIST: the Debian package when apt is available and the files are missing;
# otherwise hant falls back to torchvision's download at first use.
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -f "$FMNIST/train-images-idx3-ubyte" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
        (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
            || echo "[setup] apt could not install dataset-fashion-mnist; hant will download it with torchvision"
    fi
fi
