#!/usr/bin/env bash
# Create .venv (or $VENV) and install step3-edge with the CPU extras.
# torch is pinned first: 2.13.0 is the CPU build; an open range would pull CUDA packages.
set -euo pipefail
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,app,dev}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
