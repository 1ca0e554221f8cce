#!/bin/bash
# Qwen-1.8B pretraining (report Table 1: 2.2T tokens, 4M-token batches, peak LR 3e-4).
#   sbatch slurm/pretrain_1p8b.sh [--flag value ...]     (flags go to pretrain_qwen.py)
#   TP=2 MICRO_BATCH=2 sbatch --nodes=4 slurm/pretrain_1p8b.sh --train-iters 1000
#SBATCH --job-name=qwen-1p8b
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# Layout for 80 GB GPUs: 1.8B parameters fit whole on one GPU (bf16 weights 3.7 GB, fp32 grads
# 7.4 GB, Adam state sharded over DP by the distributed optimizer), so no tensor/pipeline
# parallelism: pure data parallelism is the fastest. Micro-batch 4 x 2048 tokens keeps activations
# (with flash attention) and the 151,936-wide logits well under 80 GB.
RECIPE=${RECIPE:-examples/pretrain_1p8b.yaml}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-2048}   # 2048 x 2048 tokens = 4M tokens per step
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

source "$(dirname "$0")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
launch_training "$@"
