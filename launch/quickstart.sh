#!/usr/bin/env bash
# The main job end-to-end on built-in data, on any machine (CPU is fine), with embedded defaults:
# demo CTs -> prepared store -> a small STU-Net trained (local MLflow) -> export -> predict a held-out
# case -> its Dice against the case's own mask files. Installs into .venv first unless STUNET_SKIP_INSTALL=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${STUNET_SKIP_INSTALL:-0}" = 1 ] || bash launch/install.sh
PATH="$PWD/.venv/bin:$PATH"

# Presets (params, FLOPs per 128^3 patch), class maps and what this machine has.
stunet-scale info

# Demo data: 8 synthetic contrast CTs in the TotalSegmentator layout (6 train, 1 val, 1 test in meta.csv).
# Both steps are idempotent: demo-data writes nothing when data_shards/demo_raw/demo.json matches the request,
# prepare skips every case whose inputs and preprocessing are unchanged, so a re-run costs seconds, and data
# written by an older stunet-scale is brought up to date.
stunet-scale demo-data data_shards/demo_raw --cases 8
# 24 large structures (class map totalseg-major; every other TotalSegmentator class is background) at 5 mm.
stunet-scale prepare data_shards/demo_raw data_shards/quickstart --classes totalseg-major --spacing 5
# Train the small STU-Net of configs/quickstart.yaml (validation on the val case, MLflow in
# runs/quickstart/mlflow.db, plots in runs/quickstart/plots). `checkpoint.resume: auto`: a re-run continues,
# or finds the run finished and exits 0.
stunet-scale train --config configs/quickstart.yaml

# Export the newest checkpoint in every transfer format: STU-Net .model/.pth, a stock nnU-Net v2
# model folder, safetensors + config.json + model card. Each format is read back and compared
# bit for bit before the folder appears.
stunet-scale export runs/quickstart runs/quickstart/export --overwrite
# What a downstream team does first: segment a CT the model never saw (the test split), output in the
# input's geometry, and score it against that case's own mask files, class by class by name. The goal: mean
# Dice >= 0.75 over the ten largest classes present (README, Quickstart: measured numbers); exit 1 if missed.
case=$(awk -F';' '$6 == "test" { print $1; exit }' data_shards/demo_raw/meta.csv)
[ -n "$case" ] || { echo "no test case in data_shards/demo_raw/meta.csv" >&2; exit 1; }
stunet-scale predict runs/quickstart/export data_shards/demo_raw/"$case"/ct.nii.gz runs/quickstart/prediction/"$case".nii.gz
stunet-scale evaluate runs/quickstart/prediction/"$case".nii.gz data_shards/demo_raw/"$case" \
    --labels runs/quickstart/export --out runs/quickstart/prediction/"$case"_dice.json --largest 10 --goal 0.75
echo "quickstart done: run dir runs/quickstart (MLflow: runs/quickstart/mlflow.db, plots: runs/quickstart/plots)," \
     "export runs/quickstart/export, prediction and Dice runs/quickstart/prediction"
