#!/usr/bin/env bash
# The main job end-to-end on built-in data, on any machine (CPU is fine), with embedded defaults.
# Installs into .venv first unless STUNET_SKIP_INSTALL=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${STUNET_SKIP_INSTALL:-0}" = 1 ] || bash launch/install.sh
PATH="$PWD/.venv/bin:$PATH"

stunet-scale info
# The model zoo's contract with the released checkpoints (keys, shapes, params, FLOPs).
python -m pytest -q tests/test_model_contract.py tests/test_flops.py
