#!/bin/bash
# Qwen-14B-Chat SFT (report 3.1: 4000 steps of 128 x 2048 tokens, LR warm-up over 1430 steps to
# 2e-6, dropout 0.1). Starts from BASE_CKPT (a megatron checkpoint of the base model, e.g.
# tools/convert_checkpoint.py hf-to-mcore of Qwen/Qwen-14B) with a fresh optimizer; a requeued
# job resumes its own --save.
#   BASE_CKPT=checkpoints/qwen_14b_base sbatch slurm/sft_14b.sh [--flag value ...]
#SBATCH --job-name=qwen-14b-sft
#SBATCH --nodes=4
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# Layout for 80 GB GPUs: TP=4 inside a node with sequence parallelism: 14.2B / 4 = 3.5B
# parameters per GPU (bf16 weights 7 GB + fp32 grads 14 GB); Adam state sharded over the 8
# data-parallel ranks (~5 GB); 40 heads / 4 and FFN 13696 / 4 divide evenly. Micro-batch 1 and
# selective recomputation (recipe) keep activations small; 128 / (1 x 8) = 16 micro-batches.
RECIPE=${RECIPE:-examples/sft_14b.yaml}
TP=${TP:-4}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}    # report 3.1: batch 128
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
BASE_CKPT=${BASE_CKPT:-checkpoints/qwen_14b_base}
SFT_DATA=${SFT_DATA:-}               # JSONL file(s), comma-separated; empty: the recipe's

source "$(dirname "$0")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
EXTRA_ARGS="--pretrained-checkpoint $BASE_CKPT${SFT_DATA:+ --sft-data-path $SFT_DATA}" launch_training "$@"
