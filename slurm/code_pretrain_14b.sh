#!/bin/bash
# Code-Qwen-14B: continued pretraining of Qwen-14B on code at 8192 context (report section 4:
# ~90B tokens, LR 6e-5, 3% warm-up, no decay). Starts from BASE_CKPT (a megatron checkpoint, e.g.
# tools/convert_checkpoint.py's output for Qwen/Qwen-14B); a requeued job resumes its own --save.
#   BASE_CKPT=checkpoints/qwen_14b_base sbatch slurm/code_pretrain_14b.sh [--flag value ...]
#SBATCH --job-name=code-qwen-14b
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

# Layout for 80 GB GPUs: TP=4 + sequence parallel (as 14B pretraining), micro-batch 1 at 8192
# tokens with selective recomputation (recipe).
RECIPE=${RECIPE:-examples/code_pretrain_14b.yaml}
TP=${TP:-4}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}    # 4M tokens per step
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
BASE_CKPT=${BASE_CKPT:-checkpoints/qwen_14b_base}

source "$(dirname "$0")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
EXTRA_ARGS="--pretrained-checkpoint $BASE_CKPT" launch_training "$@"
