#!/usr/bin/env bash
# Create the virtual environment (VENV, default .venv) and install PyTorch and the
# package with its extras. A regular, non-editable install: what users get.
# Sourced by test.sh and quick_search.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
VENV="$(cd "$VENV" && pwd)"
export PATH="$VENV/bin:$PATH"   # ninja for the just-in-time builds, the fbnet-fast script
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps .
"$VENV/bin/python" -m pip install -q ".[dev,vision,onnx,timm,examples]"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/fbnet_fast/extensions}"
