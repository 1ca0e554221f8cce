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

launch_training() {
    : "${RECIPE:?set RECIPE}" "${TP:?set TP}" "${PP:?set PP}" "${MICRO_BATCH:?}" "${GLOBAL_BATCH:?}"
    local run_name=${RUN_NAME:-$(basename "$RECIPE" .yaml)}
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local gpus_per_node=${GPUS_PER_NODE:-8}
    check_layout $(( nodes * gpus_per_node ))

    local job_id=${SLURM_JOB_ID:-local}
    local log_dir=$LOG_ROOT/${run_name}-${job_id}
    local save_dir=${SAVE_DIR:-$CKPT_ROOT/$run_name}
    mkdir -p "$log_dir" "$save_dir"

    local master_addr
    master_addr=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)
    local master_port=${MASTER_PORT:-$(( 29500 + ${SLURM_JOB_ID:-0} % 1000 ))}

    # Requeue on the time-limit warning (#SBATCH --signal=B:USR1@...) or preemption (SIGTERM):
    # ask every worker to save and exit (SIGTERM through srun -> torchrun -> workers), wait for the
    # save, then put the job back in the queue. A requeued job resumes from --load = --save.
    local srun_pid=""
    on_stop_signal() {
        echo "$(date -u +%FT%TZ) stop signal: asking workers to save a checkpoint and exit" >&2
        [[ -n "$srun_pid" ]] && kill -TERM "$srun_pid" 2>/dev/null || true
        wait "$srun_pid" 2>/dev/null || true
        if [[ -n "${SLURM_JOB_ID:-}" && "${REQUEUE:-1}" == 1 ]]; then
            scontrol requeue "$SLURM_JOB_ID" && echo "requeued job $SLURM_JOB_ID" >&2
        fi
        exit 0
    }
    trap on_stop_signal USR1 TERM

    echo "job $job_id: $nodes nodes x $gpus_per_node GPUs, TP=$TP PP=$PP, recipe $RECIPE, logs in $log_dir"
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 --output="$log_dir/%x-%j-node%n.log" \
        "$PYTHON" -m torch.distributed.run \
            --nnodes="$nodes" --nproc-per-node="$gpus_per_node" \
            --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port" --rdzv-id="$job_id" \
            --shutdown-timeout="$SAVE_TIMEOUT_S" \
            "$REPO/pretrain_qwen.py" --config "$REPO/$RECIPE" \
            --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
            --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
            --save "$save_dir" --load "$save_dir" \
            --tensorboard-dir "$log_dir/tensorboard" \
            ${EXTRA_ARGS:-} "$@" &
    srun_pid=$!
    wait "$srun_pid"
}
