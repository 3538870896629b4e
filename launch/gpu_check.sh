#!/usr/bin/env bash
# The one entry point on a lent GPU machine: every GPU number in one prepared run.
#   bash launch/gpu_check.sh [--budget-s 480] [--parts a,b] [--cpu-dry-run]
# Installs the wheels gathered by launch/gather_gpu_wheels.sh (carried as .whl/) into /tmp/site,
# since the machine reaches no package registry, puts them and this repo on PYTHONPATH, and runs
# `stunet-scale bench gpu`. Results land in $OUT (the device tool's folder that comes back) or
# ./gpu_check_out (gpu_check.json, gpu_check.md, gpu_check.log, gpu_check_parts.tar.gz). Exit code: bench gpu's (0 all parts ran, 1 a part failed or timed out, 2 usage).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # so a killed run still leaves its log lines
# The device tool brings back at most 8 files from $OUT: the run writes to a scratch folder (per-part
# JSON, stdout and stderr are ~20 files) and $OUT gets the JSON, the table, the log and one tarball.
OUT_DIR="${OUT:-gpu_check_out}"
WORK=$(mktemp -d)
mkdir -p "$OUT_DIR"
python3 -m stunet_scale bench gpu --out "$WORK" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
cp "$WORK"/gpu_check.json "$WORK"/gpu_check.md "$OUT_DIR"/ 2>/dev/null
tar -czf "$OUT_DIR/gpu_check_parts.tar.gz" -C "$WORK" parts 2>/dev/null
exit "$rc"
