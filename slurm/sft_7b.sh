#!/bin/bash
# Qwen-7B-Chat SFT (report 3.1: 4000 steps of 128 x 2048 tokens, LR warm-up over 1430 steps to
# 2e-6, dropout 0.1). Starts from BASE_CKPT (a megatron checkpoint of the base model, e.g.
# tools/convert_checkpoint.py hf-to-mcore of Qwen/Qwen-7B) with a fresh optimizer; a requeued job
# resumes its own --save. Also runs the Math and Code SFT recipes (RECIPE=..., docs/sft.md).
#   BASE_CKPT=checkpoints/qwen_7b_base sbatch slurm/sft_7b.sh [--flag value ...]
#SBATCH --job-name=qwen-7b-sft
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# Layout for 80 GB GPUs: TP=2 inside a node with sequence parallelism: 7.7B / 2 parameters per
# GPU (bf16 weights ~8 GB + fp32 grads ~15 GB); the distributed optimizer shards Adam's
# 12 bytes/parameter over the 8 data-parallel ranks (~6 GB). Micro-batch 2 x 2048 tokens leaves
# >30 GB for activations without recomputation; 128 / (2 x 8) = 8 micro-batches per step.
# 4000 x 128 x 2048 = 1.05B tokens: about 6 h on 16 H100s.
RECIPE=${RECIPE:-examples/sft_7b.yaml}
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}    # report 3.1: batch 128
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
BASE_CKPT=${BASE_CKPT:-checkpoints/qwen_7b_base}
SFT_DATA=${SFT_DATA:-}               # JSONL file(s), comma-separated; empty: the recipe's

source "$(dirname "$0")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
EXTRA_ARGS="--pretrained-checkpoint $BASE_CKPT${SFT_DATA:+ --sft-data-path $SFT_DATA}" launch_training "$@"
