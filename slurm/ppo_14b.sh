#!/bin/bash
# Qwen-14B PPO (report 3.2.2) on N nodes x 8 GPUs with four DeepSpeed engines.
#
# Placement: all four engines are co-located on every GPU and each is partitioned over all
# ranks (data parallel = nodes x 8):
#   actor   ZeRO-3, bf16, AdamW LR 1e-6, gradient checkpointing     (trains)
#   critic  ZeRO-3, bf16, AdamW LR 5e-6, gradient checkpointing     (trains)
#   ref     ZeRO-3, bf16, no optimizer, parameters offloaded to CPU (inference)
#   reward  ZeRO-3, bf16, no optimizer, parameters offloaded to CPU (inference)
# Memory per GPU at 8 nodes (64 ranks): 14.2B params x (2 actor + 2 critic bytes; ref and reward on CPU
# + 2 x 16 optimizer bytes) / 64 = ~8 GB of states, the rest is activations and the KV cache.
#
#   sbatch slurm/ppo_14b.sh
#   sbatch slurm/ppo_14b.sh --prompts-per-step 512 --actor-zero-stage 2   # extra flags go to the trainer
#SBATCH --job-name=qwen-ppo-14b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# ---- settings (override from the environment) -------------------------------------------
RECIPE=${RECIPE:-examples/ppo_14b.yaml}
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
    $REPO/tools/train_ppo.py --config $REPO/$RECIPE $*"
