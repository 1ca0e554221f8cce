#!/bin/bash
# Shared launcher for the slurm/*.sh training scripts: one torchrun per node, rendezvous on the
# first node, a log directory per job, and a clean save-then-requeue on preemption / time limit.
#
# The calling script sets the named settings (RECIPE, TP, PP, ...) and then calls
#   launch_training "$@"
# Everything in "$@" is passed through to pretrain_qwen.py (e.g. --train-iters 1000 --lr 1e-4).
#
# Environment knobs (all optional):
#   REPO           checkout to run from (default: the directory above slurm/)
#   PYTHON         python with megatron_qwen installed (default: python)
#   LOG_ROOT       where per-job log directories go (default: $REPO/logs)
#   CKPT_ROOT      where checkpoints go (default: $REPO/checkpoints)
#   MASTER_PORT    rendezvous port on the first node (default: 29500 + SLURM_JOB_ID % 1000)
#   SAVE_TIMEOUT_S seconds torchrun gives workers to save after a stop signal (default 900)
#   NCCL_*         anything you export is kept; the defaults below are for InfiniBand clusters

set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-python}
LOG_ROOT=${LOG_ROOT:-$REPO/logs}
CKPT_ROOT=${CKPT_ROOT:-$REPO/checkpoints}
SAVE_TIMEOUT_S=${SAVE_TIMEOUT_S:-900}

# --- NCCL / network (documented in docs/slurm.md) -------------------------------------------
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}          # use InfiniBand / RoCE when present
export NCCL_IB_GID_INDEX=${NCCL_IB_GID_INDEX:-3}      # RoCE v2 GID; harmless on native IB
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}  # bootstrap interface: not loopback
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}          # tolerate congested fabrics
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# megatron-core: sequence parallel / TP comm overlap needs one CUDA connection per device
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1

# Fail early, with one line, when the layout cannot tile the allocation.
check_layout() {
    local world=$1
    if (( world % (TP * PP) != 0 )); then
        echo "error: TP=$TP x PP=$PP does not divide the $world GPUs of this job" >&2; exit 2
    fi
    local dp=$(( world / (TP * PP) ))
    if (( GLOBAL_BATCH % (MICRO_BATCH * dp) != 0 )); then
        echo "error: GLOBAL_BATCH=$GLOBAL_BATCH is not divisible by MICRO_BATCH=$MICRO_BATCH x DP=$dp" >&2; exit 2
    fi
}

# Per-job directories: LOG_DIR (logs, TensorBoard) and SAVE_DIR (checkpoints).
prepare_job_dirs() {
    RUN_NAME=${RUN_NAME:-$(basename "$RECIPE" .yaml)}
    LOG_DIR=$LOG_ROOT/${RUN_NAME}-${SLURM_JOB_ID:-local}
    SAVE_DIR=${SAVE_DIR:-$CKPT_ROOT/$RUN_NAME}
    mkdir -p "$LOG_DIR" "$SAVE_DIR"
}

# One torchrun per node through srun, running $REPO/ENTRY with the given flags.
# Stop signals reach the batch shell two ways:
#   USR1 (#SBATCH --signal=B:USR1@...): the time limit is near. Ask the workers to save, wait for
#        the save, then put the job back in the queue (REQUEUE=1, the default).
#   TERM: Slurm is ending the job (preemption, `scontrol requeue`, `scancel`) and sent the TERM to
#        every process of the job, workers included; wait for their save and leave the rest to
#        Slurm: it requeues a preempted or requeued job itself, and a cancelled job stays cancelled.
# On USR1 the workers are asked with `scancel --signal=TERM <job>` (every task of the job's steps on
# every node, not the batch shell), not through srun: srun answers a TERM of its own by SIGKILLing
# its tasks, which would kill a save half-way. torchrun forwards the TERM to its workers and waits
# --shutdown-timeout for them.
run_on_nodes() {
    local entry=$1; shift
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local gpus_per_node=${GPUS_PER_NODE:-8}
    local job_id=${SLURM_JOB_ID:-local}
    local master_addr
    master_addr=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)
    local master_port=${MASTER_PORT:-$(( 29500 + ${SLURM_JOB_ID:-0} % 1000 ))}

    local srun_pid=""
    on_stop_signal() {
        local sig=$1
        trap '' USR1 TERM  # one stop at a time; a second signal must not interrupt the wait
        echo "$(date -u +%FT%TZ) SIG$sig: asking workers to save a checkpoint and exit" >&2
        if [[ "$sig" == TERM && -n "${SLURM_JOB_ID:-}" ]]; then
            :  # Slurm sent the TERM to every process of the job: a second one would cut torchrun's wait short
        elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
            scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true
        elif [[ -n "$srun_pid" ]]; then
            kill -TERM "$srun_pid" 2>/dev/null || true
        fi
        local rc=0
        wait "$srun_pid" 2>/dev/null || rc=$?
        echo "$(date -u +%FT%TZ) workers done (exit $rc)" >&2
        if [[ "$sig" == USR1 && -n "${SLURM_JOB_ID:-}" && "${REQUEUE:-1}" == 1 ]]; then
            scontrol requeue "$SLURM_JOB_ID" && echo "requeued job $SLURM_JOB_ID" >&2
        fi
        exit 0
    }
    trap 'on_stop_signal USR1' USR1
    trap 'on_stop_signal TERM' TERM

    echo "job $job_id: $nodes nodes x $gpus_per_node GPUs, $entry, recipe $RECIPE, logs in $LOG_DIR"
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 --output="$LOG_DIR/%x-%j-node%n.log" \
        "$PYTHON" -m torch.distributed.run \
            --nnodes="$nodes" --nproc-per-node="$gpus_per_node" \
            --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port" --rdzv-id="$job_id" \
            --shutdown-timeout="$SAVE_TIMEOUT_S" \
            "$REPO/$entry" "$@" &
    srun_pid=$!
    wait "$srun_pid"
}

# The Megatron trainer (pretraining, Code-Qwen, SFT): the layout comes from the named settings.
launch_training() {
    : "${RECIPE:?set RECIPE}" "${TP:?set TP}" "${PP:?set PP}" "${MICRO_BATCH:?}" "${GLOBAL_BATCH:?}"
    check_layout $(( ${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} * ${GPUS_PER_NODE:-8} ))
    prepare_job_dirs
    echo "layout: TP=$TP PP=$PP micro-batch $MICRO_BATCH global batch $GLOBAL_BATCH"
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
    run_on_nodes pretrain_qwen.py --config "$REPO/$RECIPE" \
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
        --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
        --save "$SAVE_DIR" --load "$SAVE_DIR" \
        --tensorboard-dir "$LOG_DIR/tensorboard" \
        ${EXTRA_ARGS:-} "$@"
}

# The DeepSpeed trainers (reward model, PPO): ZeRO shards over all ranks, no TP/PP to check.
launch_deepspeed_job() {
    local entry=$1; shift
    : "${RECIPE:?set RECIPE}"
    prepare_job_dirs
    # A requeued job finds its own checkpoint (DeepSpeed's 'latest' tag) and resumes from it.
    local resume=()
    [[ -f "$SAVE_DIR/latest" ]] && resume=(--load "$SAVE_DIR")
    # shellcheck disable=SC2086
    run_on_nodes "$entry" --config "$REPO/$RECIPE" --save "$SAVE_DIR" "${resume[@]}" \
        --tensorboard-dir "$LOG_DIR/tensorboard" ${EXTRA_ARGS:-} "$@"
}
