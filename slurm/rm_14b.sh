#!/bin/bash
# Qwen-14B reward model (PMP, then fine-tuning) with DeepSpeed ZeRO-3, bf16, on N nodes x 8 GPUs.
#   sbatch slurm/rm_14b.sh                                   # PMP stage (examples/rm_pmp_14b.yaml)
#   RECIPE=examples/rm_finetune_14b.yaml sbatch slurm/rm_14b.sh
#   sbatch slurm/rm_14b.sh --lr 1e-6 --zero-stage 3          # extra flags go to the trainer
#SBATCH --job-name=qwen-rm-14b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# ---- settings (override from the environment) -------------------------------------------
RECIPE=${RECIPE:-examples/rm_pmp_14b.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
REPO=${REPO:-$(pwd)}
VENV=${VENV:-$REPO/.venv}
# -------------------------------------------------------------------------------------------

mkdir -p logs
source "$VENV/bin/activate"
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=8
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# one torchrun per node; DeepSpeed reads RANK/WORLD_SIZE/LOCAL_RANK from torchrun
srun --kill-on-bad-exit=1 bash -c "torchrun \
    --nnodes=$SLURM_NNODES --nproc-per-node=$GPUS_PER_NODE --node-rank=\$SLURM_NODEID \
    --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$SLURM_JOB_ID \
    $REPO/tools/train_reward_model.py --config $REPO/$RECIPE $*"
