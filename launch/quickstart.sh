#!/usr/bin/env bash
# The main job end-to-end on built-in data, on any machine (CPU is fine), with embedded defaults.
# Installs into .venv first unless STUNET_SKIP_INSTALL=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${STUNET_SKIP_INSTALL:-0}" = 1 ] || bash launch/install.sh
PATH="$PWD/.venv/bin:$PATH"

# Presets (params, FLOPs per 128^3 patch), class maps and what this machine has.
stunet-scale info

# Demo data: 8 synthetic CTs in the TotalSegmentator layout -> a validated Zarr v3 + WebDataset store.
# The raw phantoms are generated once; `prepare` always runs: it is idempotent and skips every case
# whose inputs and preprocessing parameters are unchanged, so a re-run costs seconds, and a store
# written by an older stunet-scale (another store format or preprocessing) is brought up to date.
[ -f data_shards/demo_raw/meta.csv ] || stunet-scale demo-data data_shards/demo_raw --cases 8
stunet-scale prepare data_shards/demo_raw data_shards/demo --classes stunet
# Train the tiny STU-Net of configs/debug.yaml (300 steps, checkpoints every 100, validation, MLflow in
# runs/debug/mlflow.db). `checkpoint.resume: auto`: a re-run continues, or finds the run finished and exits 0.
stunet-scale train --config configs/debug.yaml

# Export the newest checkpoint in every transfer format: STU-Net .model/.pth, a stock nnU-Net v2
# model folder, safetensors + config.json + model card. Each format is read back and compared
# bit for bit before the folder appears.
stunet-scale export runs/debug runs/debug/export --overwrite
# What a downstream team tries first: segment a CT with the export, output in the input's geometry.
# The first case (s0001, ...) by glob, not by parsing ls: globs sort the same and never split names.
cts=(data_shards/demo_raw/s*/ct.nii.gz)
[ -f "${cts[0]}" ] || { echo "no data_shards/demo_raw/s*/ct.nii.gz to predict on" >&2; exit 1; }
case=$(basename "$(dirname "${cts[0]}")")
stunet-scale predict runs/debug/export data_shards/demo_raw/"$case"/ct.nii.gz runs/debug/prediction/"$case".nii.gz
echo "quickstart done: run dir runs/debug (MLflow: runs/debug/mlflow.db), export runs/debug/export, prediction runs/debug/prediction"
