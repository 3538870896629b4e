#!/usr/bin/env bash
# `stunet-scale prepare` on a Slurm cluster: a job array over slices of the case list, then one
# dependent --finalize job that merges the slices, checks nothing is missing and writes manifest.json.
#
#   bash slurm/submit_prepare.sh SOURCE OUT [--num-shards N] [-- prepare options...]
#       e.g. bash slurm/submit_prepare.sh /data/Totalsegmentator_dataset_v201 data_shards/totalseg \
#                --num-shards 32 -- --classes stunet --spacing 1.5
#   sbatch --array=0-31 slurm/submit_prepare.sh SOURCE OUT [-- prepare options...]
#       the same, submitted by hand: the lowest array task queues the --finalize job itself.
#
# Each array task prepares every N-th WebDataset shard group (a few cases each), so tasks never
# write the same files; finished cases are skipped on a rerun, so a failed task is simply resubmitted
# with the original count (`sbatch --array=<failed ids> slurm/submit_prepare.sh SOURCE OUT --num-shards N
# [-- ...]`; its lowest task queues a new finalize job). The finalize job runs only if every task
# succeeded (afterok). Task i always prepares slice i of N; N is --num-shards, else the array's size
# when the array is the whole range 0-(N-1).
#
#SBATCH --job-name=stunet-prepare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem-per-cpu=4G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%A_%a.out
#
# --cpus-per-task: one task decodes and resamples several cases in parallel (--workers defaults to
#   the CPUs Slurm gave it); TotalSegmentator CTs need a few GB each while resampling.

set -euo pipefail

PYTHON=${STUNET_PYTHON:-python}                       # the interpreter with stunet-scale installed
PREPARE=("$PYTHON" -m stunet_scale prepare)
read -r -a SBATCH_ARGS <<<"${STUNET_PREPARE_SBATCH_ARGS:-}"  # extra sbatch flags, e.g. "--partition=cpu --cpus-per-task=16"

usage() {
    echo "usage: bash slurm/submit_prepare.sh SOURCE OUT [--num-shards N] [-- stunet-scale prepare options]" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
SOURCE=$1
OUT=$2
shift 2
# The slice count as given (--num-shards, else $STUNET_PREPARE_SHARDS, which the login-node path
# passes to its array); empty = not given. Kept apart from the login node's default of 16 because an
# array task must not mistake that default for the real count.
NUM_SHARDS_GIVEN=${STUNET_PREPARE_SHARDS:-}
if [[ ${1:-} == --num-shards ]]; then
    [[ $# -ge 2 ]] || usage
    NUM_SHARDS_GIVEN=$2
    shift 2
fi
NUM_SHARDS=${NUM_SHARDS_GIVEN:-16}
if [[ ${1:-} == -- ]]; then
    shift
fi
EXTRA=("$@")
ROLE=${STUNET_PREPARE_ROLE:-}

log() { echo "[submit_prepare $(date '+%F %T')] $*"; }

# Workers per task: the CPUs Slurm gave this task, unless the prepare options say otherwise.
workers=()
if [[ " ${EXTRA[*]:-} " != *" --workers "* && -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    workers=(--workers "$SLURM_CPUS_PER_TASK")
fi

submit_finalize() {  # $1 = array job id
    local job
    job=$(STUNET_PREPARE_ROLE=finalize sbatch --parsable --dependency="afterok:$1" --kill-on-invalid-dep=yes \
        --job-name=stunet-prepare-finalize --output="slurm-%x-%j.out" "${SBATCH_ARGS[@]}" \
        "$SCRIPT" "$SOURCE" "$OUT" -- "${EXTRA[@]}")
    echo "finalize job ${job%%;*} (after every task of array job $1 succeeded)"
}

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    # On the login node: submit the array and the finalize job.
    if ! [[ $NUM_SHARDS =~ ^[1-9][0-9]*$ ]]; then
        echo "--num-shards must be a positive integer, got '$NUM_SHARDS'" >&2
        exit 2
    fi
    SCRIPT=$(readlink -f "$0")
    array=$(STUNET_PREPARE_ROLE=slice STUNET_PREPARE_SHARDS=$NUM_SHARDS sbatch --parsable \
        --array="0-$((NUM_SHARDS - 1))" "${SBATCH_ARGS[@]}" "$SCRIPT" "$SOURCE" "$OUT" -- "${EXTRA[@]}")
    array=${array%%;*}
    echo "array job $array: $NUM_SHARDS slices of $SOURCE -> $OUT"
    submit_finalize "$array"
    exit 0
fi

if [[ $ROLE == finalize ]]; then
    log "finalize $OUT"
    exec "${PREPARE[@]}" "$SOURCE" "$OUT" --finalize "${workers[@]}" "${EXTRA[@]}"
fi

if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "submit this as a job array (sbatch --array=0-N-1 ...) or run it with bash on the login node" >&2
    exit 2
fi

# Inside an array task: task i prepares slice i. The index is the task id itself, never its offset
# in this array, so a retry of some tasks (`sbatch --array=3,7 ... --num-shards 16`) prepares the
# same slices 3 and 7 of 16 that failed.
INDEX=$SLURM_ARRAY_TASK_ID
if [[ -z $NUM_SHARDS_GIVEN ]]; then
    # No count given: the array itself must be the whole 0..N-1 range, or its size is not the count.
    first=${SLURM_ARRAY_TASK_MIN:-}
    last=${SLURM_ARRAY_TASK_MAX:-}
    count=${SLURM_ARRAY_TASK_COUNT:-}
    if [[ $first != 0 || -z $count || $last != $((count - 1)) ]]; then
        echo "array tasks ${first:-?}-${last:-?} (${count:-?} tasks) are not the whole range 0-(N-1), so the number" \
            "of slices is unknown: pass the original count, e.g. sbatch --array=<failed ids>" \
            "slurm/submit_prepare.sh SOURCE OUT --num-shards N [-- ...]" >&2
        exit 2
    fi
    NUM_SHARDS=$count
fi
if ! [[ $NUM_SHARDS =~ ^[1-9][0-9]*$ ]] || ((INDEX >= NUM_SHARDS)); then
    echo "array task $INDEX is not a slice of --num-shards '$NUM_SHARDS' (tasks must be 0-(N-1))" >&2
    exit 2
fi
if [[ -z $ROLE && $SLURM_ARRAY_TASK_ID == "${SLURM_ARRAY_TASK_MIN:-0}" ]]; then
    # Submitted by hand with sbatch --array: the first task queues the finalize job once.
    SCRIPT=$(scontrol show job -o "$SLURM_JOB_ID" | tr ' ' '\n' | sed -n 's/^Command=//p')
    submit_finalize "$SLURM_ARRAY_JOB_ID"
fi
log "slice $INDEX of $NUM_SHARDS: $SOURCE -> $OUT"
exec "${PREPARE[@]}" "$SOURCE" "$OUT" --shard-index "$INDEX" --num-shards "$NUM_SHARDS" "${workers[@]}" "${EXTRA[@]}"
