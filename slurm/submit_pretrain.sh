#!/usr/bin/env bash
# STU-Net pretraining on N nodes x G GPUs under Slurm, with preemption handling and automatic resume.
#
#   sbatch slurm/submit_pretrain.sh configs/pretrain/totalseg_stunet_h.yaml [dotted overrides...]
#   sbatch --nodes=8 --time=48:00:00 slurm/submit_pretrain.sh CONFIG ...   # sbatch flags beat the lines below
#   STUNET_LAUNCHER=torchrun sbatch slurm/submit_pretrain.sh CONFIG ...     # torchrun instead of accelerate
#   STUNET_CHAIN=1 sbatch slurm/submit_pretrain.sh CONFIG ...               # clusters without requeue
#
# What happens:
#   1. The config is resolved and checked for this allocation's world size (`python -m
#      stunet_scale train --dry-run`) before any rank starts. Every allocation appends its srun line and each node's
#      exact launcher command to <run_dir>/slurm/allocations.log; the trainer writes the resolved
#      config, the git revision and the launch command (launch_command.txt, launches.jsonl).
#   2. One srun task per node runs `accelerate launch` (or torchrun): c10d rendezvous at the head
#      node, machine rank = SLURM_NODEID, one rank per GPU.
#   3. Shortly before the time limit Slurm sends SIGUSR1 (--signal below) to every process of the
#      step. The launchers forward it to their ranks (PET_SIGNALS_TO_HANDLE), the trainer agrees
#      across ranks at the next step, saves one checkpoint and exits with its requeue code.
#   4. This script then requeues the job (`scontrol requeue`: same job id, same queue position), or
#      in chain mode leaves the follow-up job (--dependency=singleton) to start. The next allocation
#      runs the same command; `checkpoint.resume: auto` continues from the newest valid checkpoint
#      into the same MLflow run.
#
# Ask for a graceful stop + requeue by hand:  scancel --signal=USR1 <jobid>
#
#SBATCH --job-name=stunet-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# --ntasks-per-node=1: one launcher per node; it starts one rank per GPU (never one task per GPU
#   here, or every node would start G launchers).
# --cpus-per-task: every CPU of the node for the launcher, its ranks and their data-loader workers
#   (3D augmentation is CPU-heavy when it does not run on the GPU).
# --signal=USR1@600: lead time >= one training step + one checkpoint save + ~60 s of Slurm slack
#   (ZeRO-3 checkpoints of STU-Net-H are tens of GB). Keep TORCH_ELASTIC_SHUTDOWN_TIMEOUT below it.
# --requeue + --open-mode=append: the requeued job keeps its id and appends to the same log.

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch slurm/submit_pretrain.sh CONFIG.yaml [section.key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
OVERRIDES=("$@")

# ---------------------------------------------------------------------------------------------
# Knobs. Export them before sbatch (sbatch passes the environment on), or edit the defaults.
# ---------------------------------------------------------------------------------------------
PYTHON=${STUNET_PYTHON:-python}                      # the interpreter with stunet-scale installed
LAUNCHER=${STUNET_LAUNCHER:-accelerate}              # accelerate | torchrun
TRAIN_MODULE=${STUNET_TRAIN_MODULE:-stunet_scale.train}  # what every rank runs (python -m ...)
PROCS_PER_NODE=${STUNET_PROCS_PER_NODE:-auto}        # ranks per node; auto = GPUs on the node (1 without GPU)
DATA_WORKERS=${STUNET_DATA_WORKERS:-}                # data-loader workers per rank (empty = the config's value)
PREEMPT_SIGNAL=${STUNET_PREEMPT_SIGNAL:-USR1}        # must match --signal above
MAX_REQUEUES=${STUNET_MAX_REQUEUES:-100}             # stop requeueing after this many allocations
CHAIN=${STUNET_CHAIN:-0}                             # 1 = submit a --dependency=singleton follow-up instead of requeue
CHAIN_MAX=${STUNET_CHAIN_MAX:-100}                   # longest chain
CHAIN_SBATCH_ARGS=${STUNET_CHAIN_SBATCH_ARGS:-}      # extra sbatch flags for follow-up jobs (space separated)
DRY_RUN=${STUNET_DRY_RUN:-1}                         # 0 = skip the one-process config check before launch

# Signals: torchrun / accelerate launch die on SIGUSR1 by default without telling their ranks;
# with it in this list they forward it to every rank and wait TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# seconds (one step + one save, below the --signal lead time) before SIGKILL.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIG${PREEMPT_SIGNAL}}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-540}

# NCCL / PyTorch. Leave NCCL's auto-detection on first; check one run with
# NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET that it uses NET/IB with all HCAs. To pin, export:
#   NCCL_SOCKET_IFNAME=ib0         bootstrap interface (prefix list; =eth0 exact; ^docker,lo excludes)
#   NCCL_IB_HCA=mlx5               RDMA devices (=mlx5_0:1,mlx5_1:1 exact; ^=mlx5_4 drops a storage HCA)
#   NCCL_IB_GID_INDEX=3            RoCE only; leave unset on InfiniBand
#   NCCL_IB_TIMEOUT=22             IB verbs timeout exponent, for congested fabrics
# The collective timeout itself is distributed.timeout_s in the config (keep it above the longest
# checkpoint save: other ranks wait at a barrier meanwhile).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}  # abort on a failed collective
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}            # flight recorder dump on a hang
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-20000}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONFAULTHANDLER=1
export PYTHONUNBUFFERED=1

log() { echo "[submit_pretrain $(date '+%F %T')] $*"; }

# ---------------------------------------------------------------------------------------------
# Outside Slurm: nothing to do here.
# ---------------------------------------------------------------------------------------------
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "not inside a Slurm job: submit with  sbatch $0 $CONFIG ${OVERRIDES[*]:-}" >&2
    exit 2
fi

# PET_SIGNALS_TO_HANDLE is torchrun's --signals-to-handle (pytorch/pytorch#160690, Aug 2025), which
# `accelerate launch` inherits by parsing torchrun's options. A torch without it ignores the variable:
# SIGUSR1 then kills the launcher of either STUNET_LAUNCHER, the ranks never see it, no checkpoint is
# saved and the preemption loses everything since the last periodic one. No launcher path avoids
# that, so refuse before anything is queued or started (pyproject allows torch releases without it).
torchrun_help=$("$PYTHON" -m torch.distributed.run --help)
if [[ $torchrun_help != *--signals-to-handle* ]]; then
    torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo unknown)
    echo "submit_pretrain.sh: torch $torch_version ($PYTHON) has no torchrun --signals-to-handle, so" \
        "PET_SIGNALS_TO_HANDLE is ignored and the preemption signal SIG$PREEMPT_SIGNAL would kill the launchers" \
        "(accelerate and torchrun alike) without reaching the ranks: no checkpoint at the signal, the work since the last one is lost." \
        "Fix: upgrade torch in that environment until \`$PYTHON -m torch.distributed.run --help\` lists" \
        "--signals-to-handle (pip install -U torch; torch from late 2025 on)." >&2
    exit 2
fi

RESTART=${SLURM_RESTART_COUNT:-0}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
JOB_REF=$SLURM_JOB_ID
if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
    JOB_REF=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
fi

# ---------------------------------------------------------------------------------------------
# Chain mode: queue the follow-up now, so it exists even if this job is killed hard. Before
# anything below exports per-allocation values (port, threads), which the follow-up would inherit.
# ---------------------------------------------------------------------------------------------
NEXT_JOB=
# shellcheck disable=SC2317  # (invoked by traps and below)
cancel_follow_up() {
    if [[ -n $NEXT_JOB ]]; then
        scancel "$NEXT_JOB" || true
        log "chain: cancelled follow-up $NEXT_JOB"
        NEXT_JOB=
    fi
}
# A setup error from here on (bad config, ...) must not leave a chain of failing jobs behind; a
# hard kill or the time limit (SIGTERM) does leave the follow-up, which is the point of chaining.
trap cancel_follow_up ERR
if [[ $CHAIN == 1 ]]; then
    CHAIN_INDEX=${STUNET_CHAIN_INDEX:-0}
    if ((CHAIN_INDEX + 1 < CHAIN_MAX)); then
        # sbatch re-reads the #SBATCH lines from the script; the flags given at submission are
        # rebuilt from this job's allocation.
        job_fields=$(scontrol show job -o "$SLURM_JOB_ID" | tr ' ' '\n')
        SCRIPT=$(sed -n 's/^Command=//p' <<<"$job_fields")
        STDOUT=$(sed -n 's/^StdOut=//p' <<<"$job_fields")  # every link appends to the first link's log
        TIME_LIMIT=$(squeue -h -j "$SLURM_JOB_ID" -o %l)
        next_args=(--parsable --dependency=singleton --job-name="$SLURM_JOB_NAME" --nodes="$NNODES")
        [[ -n $STDOUT ]] && next_args+=(--output="$STDOUT")
        [[ -n $TIME_LIMIT && $TIME_LIMIT != UNLIMITED ]] && next_args+=(--time="$TIME_LIMIT")
        [[ -n ${SLURM_JOB_PARTITION:-} ]] && next_args+=(--partition="$SLURM_JOB_PARTITION")
        [[ -n ${SLURM_JOB_ACCOUNT:-} ]] && next_args+=(--account="$SLURM_JOB_ACCOUNT")
        [[ -n ${SLURM_JOB_QOS:-} ]] && next_args+=(--qos="$SLURM_JOB_QOS")
        [[ -n ${SLURM_GPUS_PER_NODE:-} ]] && next_args+=(--gpus-per-node="$SLURM_GPUS_PER_NODE")
        [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && next_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
        read -r -a extra <<<"$CHAIN_SBATCH_ARGS"
        NEXT_JOB=$(STUNET_CHAIN_INDEX=$((CHAIN_INDEX + 1)) sbatch "${next_args[@]}" "${extra[@]}" "$SCRIPT" "$CONFIG" "${OVERRIDES[@]}")
        log "chain: follow-up job $NEXT_JOB queued (--dependency=singleton), link $((CHAIN_INDEX + 1)) of at most $CHAIN_MAX"
    else
        log "chain: reached STUNET_CHAIN_MAX=$CHAIN_MAX; no follow-up"
    fi
fi

# Ranks per node: the GPUs Slurm gave us, else what nvidia-smi sees, else one CPU rank.
if [[ $PROCS_PER_NODE == auto ]]; then
    if [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} -gt 0 ]]; then
        PROCS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        PROCS_PER_NODE=$(nvidia-smi -L | wc -l)
    else
        PROCS_PER_NODE=1
    fi
fi
WORLD=$((NNODES * PROCS_PER_NODE))

# CPU-only nodes (tests, debugging): DeepSpeed must not probe for CUDA.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

# Threads: the task's CPUs shared by the ranks of this node (data workers are separate processes).
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS / PROCS_PER_NODE > 0 ? CPUS / PROCS_PER_NODE : 1))}
if [[ -n $DATA_WORKERS ]]; then
    OVERRIDES+=("data.num_workers=$DATA_WORKERS")
fi

# The requeue exit code is the trainer's constant, read from the code so the two cannot drift.
if [[ -z ${STUNET_EXIT_REQUEUE:-} ]]; then
    STUNET_EXIT_REQUEUE=$("$PYTHON" -c 'from stunet_scale.train import EXIT_REQUEUE; print(EXIT_REQUEUE)')
fi
EXIT_REQUEUE=$STUNET_EXIT_REQUEUE

# Resolve the config once: a typo fails here, before N nodes start. The run directory is where
# checkpoints, the resolved config and the launch record go.
resolved=$("$PYTHON" -c '
import os, sys
from stunet_scale.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"config error: {e}")
print(cfg.distributed.backend, os.path.abspath(cfg.run_dir))
' "$CONFIG" "${OVERRIDES[@]}")
BACKEND=${resolved%% *}
RUN_DIR=${resolved#* }
STATE_DIR=$RUN_DIR/slurm
mkdir -p "$STATE_DIR"
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$STATE_DIR/nccl_trace_${SLURM_JOB_ID}_}

# Rendezvous: the head node's address as Slurm reaches it, and a port free there. The batch
# script runs on the head node (the first node of the allocation), so the port check is local.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$HEAD_NODE" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
MASTER_ADDR=${MASTER_ADDR:-$HEAD_NODE}
if [[ -z ${MASTER_PORT:-} ]]; then
    MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi
export MASTER_ADDR MASTER_PORT

log "job $JOB_REF allocation $RESTART: $NNODES node(s) x $PROCS_PER_NODE rank(s) = $WORLD, head $HEAD_NODE ($MASTER_ADDR:$MASTER_PORT), launcher $LAUNCHER, run_dir $RUN_DIR"

# ---------------------------------------------------------------------------------------------
# One-process check of the W-rank configuration (batch arithmetic, shards vs ranks, ZeRO, memory).
# ---------------------------------------------------------------------------------------------
if [[ $DRY_RUN == 1 ]]; then
    if ! "$PYTHON" -m stunet_scale train --config "$CONFIG" --dry-run --world-size "$WORLD" "${OVERRIDES[@]}"; then
        log "dry run failed: fix the config (see above); not launching"
        cancel_follow_up
        exit 2
    fi
fi

# ---------------------------------------------------------------------------------------------
# The per-node launch command. @NODE_RANK@ and @IS_HEAD@ are filled in by each srun task.
# ---------------------------------------------------------------------------------------------
if [[ $LAUNCHER == accelerate ]]; then
    launch=("$PYTHON" -m accelerate.commands.launch
        --num_machines "$NNODES" --num_processes "$WORLD" --machine_rank @NODE_RANK@
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
        --rdzv_backend c10d --max_restarts 0 --monitor_interval 5)
    if [[ $BACKEND == deepspeed ]]; then
        # Under srun every node already runs its own launcher: the "standard" multinode launcher
        # (torchrun underneath), not the default pdsh/ssh fan-out from the head node.
        launch+=(--use_deepspeed --deepspeed_multinode_launcher standard --zero3_init_flag false)
    else
        launch+=(--multi_gpu)
    fi
elif [[ $LAUNCHER == torchrun ]]; then
    launch=("$PYTHON" -m torch.distributed.run
        --nnodes "$NNODES" --nproc_per_node "$PROCS_PER_NODE" --node_rank @NODE_RANK@
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID-$RESTART"
        --max_restarts 0 --monitor_interval 5)
else
    echo "STUNET_LAUNCHER must be accelerate or torchrun, got '$LAUNCHER'" >&2
    exit 2
fi
# The head node hosts the rendezvous store; decided by rank, not by matching host names.
launch+=(--rdzv_conf is_host=@IS_HEAD@)
launch+=(-m "$TRAIN_MODULE" --config "$CONFIG" "${OVERRIDES[@]}")

SRUN=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --wait=120 --export=ALL)

# The record of what ran, appended once per allocation; each node adds its exact command below.
CODE_DIR=$("$PYTHON" -c 'import os, stunet_scale; print(os.path.dirname(os.path.dirname(os.path.abspath(stunet_scale.__file__))))')
ALLOC_LOG=$STATE_DIR/allocations.log
ALLOC_STAMP=$STATE_DIR/allocation.$SLURM_JOB_ID.$RESTART.start
touch "$ALLOC_STAMP"
{
    echo "# $(date '+%F %T') job $JOB_REF allocation $RESTART on $SLURM_JOB_NODELIST (head $HEAD_NODE)"
    echo "# code $CODE_DIR git $(git -C "$CODE_DIR" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$CODE_DIR" diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)'), cwd $PWD"
    echo "# env PROCS_PER_NODE=$PROCS_PER_NODE OMP_NUM_THREADS=$OMP_NUM_THREADS PET_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT${DS_ACCELERATOR:+ DS_ACCELERATOR=$DS_ACCELERATOR}"
    printf '%q ' "${SRUN[@]}" "${launch[@]}"
    echo
} >>"$ALLOC_LOG"

# ---------------------------------------------------------------------------------------------
# Run. Launchers exit 1 after forwarding a signal, so the trainer's requeue code does not survive
# them: each node's wrapper leaves a marker when the preemption signal reached its step and the
# launcher stopped, then exits 0, so srun's --kill-on-bad-exit does not cut the other nodes short
# while they finish their part of the exit.
# ---------------------------------------------------------------------------------------------
# shellcheck disable=SC2317  # (invoked by srun through bash -c)
node_main() {
    local got_signal=0 rc=0 arg is_head=$((SLURM_NODEID == 0 ? 1 : 0))
    trap 'got_signal=1' "$PREEMPT_SIGNAL"
    local cmd=()
    for arg in "$@"; do
        arg=${arg//@NODE_RANK@/$SLURM_NODEID}
        cmd+=("${arg//@IS_HEAD@/$is_head}")
    done
    # The trainer records this as its launch command (launch_command.txt, launches.jsonl, MLflow).
    STUNET_LAUNCH_COMMAND="$SRUN_TEXT$(printf '%q ' "${cmd[@]}")"
    export STUNET_LAUNCH_COMMAND
    echo "# node $SLURM_NODEID ($(hostname)): $STUNET_LAUNCH_COMMAND" >>"$ALLOC_LOG"
    # accelerate and torchrun exit 1 whatever code their workers returned; the first rank that exits
    # non-zero writes its own code (2 config, 3 diverged, 4 no valid checkpoint, 74 disk full) here.
    STUNET_EXIT_CODE_FILE="$STATE_DIR/exit.$SLURM_JOB_ID.$RESTART.node$SLURM_NODEID"
    export STUNET_EXIT_CODE_FILE
    rm -f "$STUNET_EXIT_CODE_FILE"
    "${cmd[@]}" || rc=$?
    if ((rc != 0)) && [[ -s $STUNET_EXIT_CODE_FILE ]]; then
        rc=$(<"$STUNET_EXIT_CODE_FILE")
    fi
    if ((got_signal && rc != 0)); then
        echo "node $SLURM_NODEID: launcher exited $rc after SIG$PREEMPT_SIGNAL" >"$STATE_DIR/preempted.$SLURM_JOB_ID.$RESTART.node$SLURM_NODEID"
        exit 0
    fi
    exit "$rc"
}
export -f node_main
# shellcheck disable=SC2016  # ($@ is node_main's, expanded by the bash that srun starts)
SRUN_TEXT="$(printf '%q ' "${SRUN[@]}" bash -c 'node_main "$@"' node_main)"
export PREEMPT_SIGNAL STATE_DIR ALLOC_LOG RESTART SRUN_TEXT

# The batch shell itself only gets the signal with --signal=B:... or scancel --full/--batch; then
# pass it on to the job steps so the ranks see it too. srun runs in the background so that the
# trap can run while we wait.
# shellcheck disable=SC2317  # (invoked by the trap)
forward_signal() {
    log "batch shell got SIG$PREEMPT_SIGNAL: forwarding it to the job steps"
    scancel --signal="$PREEMPT_SIGNAL" "$SLURM_JOB_ID" || true
}
trap forward_signal "$PREEMPT_SIGNAL"

"${SRUN[@]}" bash -c 'node_main "$@"' node_main "${launch[@]}" &
SRUN_PID=$!
while :; do
    rc=0
    wait "$SRUN_PID" || rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break  # still running: wait was interrupted by the trap
done
trap - "$PREEMPT_SIGNAL"

# Preempted = the step received the preemption signal (node markers), or the trainer says so: its
# requeue exit code when no launcher hides it, or the REQUEUE file it writes in the run dir.
preempted=0
if ((rc == EXIT_REQUEUE)) || compgen -G "$STATE_DIR/preempted.$SLURM_JOB_ID.$RESTART.node*" >/dev/null \
    || [[ $RUN_DIR/REQUEUE -nt $ALLOC_STAMP ]]; then
    preempted=1
fi

if ((rc == 0 && preempted == 0)); then
    log "training finished (allocation $RESTART)"
    cancel_follow_up
    exit 0
fi
if ((preempted == 0)); then
    log "training failed with exit code $rc (not a preemption); not requeueing"
    cancel_follow_up
    exit "$rc"
fi
if [[ $CHAIN == 1 ]]; then
    log "preempted after a checkpoint; follow-up ${NEXT_JOB:-<none>} continues the run"
    exit 0
fi
if ((RESTART + 1 >= MAX_REQUEUES)); then
    log "preempted, but STUNET_MAX_REQUEUES=$MAX_REQUEUES allocations are used up; resubmit to continue"
    exit "$EXIT_REQUEUE"
fi
log "preempted after a checkpoint: requeueing job $JOB_REF (allocation $((RESTART + 1)) resumes it)"
scontrol requeue "$JOB_REF"
# Slurm ends this allocation now; the requeued job starts the same command again.
exit 0
