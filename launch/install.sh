#!/usr/bin/env bash
# Fresh-machine install: a virtualenv with torch first, then stunet-scale[dev] pinned to that torch.
#
# Why torch first and a constraints file: nnunetv2 (dev extra) and deepspeed require torch, and
# without a pin pip would "upgrade" a CPU or site-provided torch to the newest multi-GB CUDA build.
# On a GPU cluster, point VENV at your environment and set TORCH_SPEC to the torch you already use
# (or TORCH_SPEC=skip to keep it untouched).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if [ "$TORCH_SPEC" != "skip" ]; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
# Pin exactly the torch now installed (local tags like +cpu dropped so the pin matches any build of it).
"$PY" -W ignore -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > "$VENV/constraints.txt"
"$PY" -m pip install -q -c "$VENV/constraints.txt" -e ".[${EXTRAS}]"
# nnunetv2 -> dynamic-network-architectures -> timm -> torchvision. Where the registry has no
# torchvision build matching this torch (e.g. a CPU torch), the one pip picks crashes on import
# ("operator torchvision::nms does not exist"), and `accelerate` imports timm, so the
# `accelerate launch` command would die too. Neither stunet-scale nor the nnU-Net UNets use them
# (only DNA's Primus/EVA transformer models do), so drop a broken pair rather than ship it.
if "$PY" -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("torchvision") else 1)' \
   && ! "$PY" -c 'import torchvision' >/dev/null 2>&1; then
  echo "torchvision does not match torch $("$PY" -c 'import torch; print(torch.__version__)'); removing torchvision and timm (unused here)"
  "$PY" -m pip uninstall -q -y torchvision timm
fi
"$PY" -c 'import torch, stunet_scale; print(f"installed stunet-scale {stunet_scale.__version__} with torch {torch.__version__} in '"$VENV"'")'
