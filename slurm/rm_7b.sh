#!/bin/bash
# Qwen-7B reward model (PMP, then fine-tuning) with DeepSpeed ZeRO-2, bf16, on N nodes x 8 GPUs.
#   sbatch slurm/rm_7b.sh                                   # PMP stage (examples/rm_pmp_7b.yaml)
#   RECIPE=examples/rm_finetune_7b.yaml sbatch slurm/rm_7b.sh
#   sbatch slurm/rm_7b.sh --lr 1e-6 --zero-stage 3          # extra flags go to the trainer
#SBATCH --job-name=qwen-rm-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# ---- settings (override from the environment) -------------------------------------------
RECIPE=${RECIPE:-examples/rm_pmp_7b.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# -------------------------------------------------------------------------------------------

source "$(dirname "$0")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
launch_deepspeed_job tools/train_reward_model.py "$@"
