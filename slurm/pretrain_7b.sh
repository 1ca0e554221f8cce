#!/bin/bash
# Qwen-7B pretraining (report Table 1: 2.4T tokens, 4M-token batches, peak LR 3e-4).
#   sbatch slurm/pretrain_7b.sh [--flag value ...]     (flags go to pretrain_qwen.py)
#SBATCH --job-name=qwen-7b
#SBATCH --nodes=4
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# Layout for 80 GB GPUs: TP=2 inside a node (NVLink) with sequence parallelism halves the 7.7B
# weights and fp32 grads per GPU (~23 GB) and the activations; the distributed optimizer shards
# Adam's 12 bytes/parameter over the 16 data-parallel ranks (~3 GB). No pipeline: no bubble.
RECIPE=${RECIPE:-examples/pretrain_7b.yaml}
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-2048}   # 4M tokens per step
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

source "$(dirname "$0")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
launch_training "$@"
