#!/bin/bash
# Code-Qwen-7B: continued pretraining of Qwen-7B on code at 8192 context (report section 4:
# ~90B tokens, LR 3e-5, 3% warm-up, no decay). Starts from BASE_CKPT (a megatron checkpoint, e.g.
# tools/convert_checkpoint.py's output for Qwen/Qwen-7B); a requeued job resumes its own --save.
#   BASE_CKPT=checkpoints/qwen_7b_base sbatch slurm/code_pretrain_7b.sh [--flag value ...]
#SBATCH --job-name=code-qwen-7b
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

# Layout for 80 GB GPUs: as pretraining (TP=2 + sequence parallel) but 4x longer sequences, so
# micro-batch 1 and selective recomputation (recipe); logits of 8192 tokens are 5 GB, halved by TP.
RECIPE=${RECIPE:-examples/code_pretrain_7b.yaml}
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}    # 512 x 8192 tokens = 4M tokens per step
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
BASE_CKPT=${BASE_CKPT:-checkpoints/qwen_7b_base}

source "$(dirname "$0")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
EXTRA_ARGS="--pretrained-checkpoint $BASE_CKPT" launch_training "$@"
