#!/bin/bash
# Qwen-14B pretraining (report Table 1: 3.0T tokens, 4M-token batches, peak LR 3e-4).
#   sbatch slurm/pretrain_14b.sh [--flag value ...]     (flags go to pretrain_qwen.py)
#SBATCH --job-name=qwen-14b
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@1200
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# Layout for 80 GB GPUs: TP=4 inside a node with sequence parallelism: 14.2B / 4 = 3.5B
# parameters per GPU (bf16 weights 7 GB + fp32 grads 14 GB); Adam state sharded over 16 DP ranks
# (~3 GB); 40 heads / 4 and FFN 13696 / 4 divide evenly. Micro-batch 1 plus selective
# recomputation (in the recipe) keep activations under ~30 GB.
RECIPE=${RECIPE:-examples/pretrain_14b.yaml}
TP=${TP:-4}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-2048}   # 4M tokens per step
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

source "$(dirname "$0")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
launch_training "$@"
