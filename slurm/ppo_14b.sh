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
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# ---- settings (override from the environment) -------------------------------------------
RECIPE=${RECIPE:-examples/ppo_14b.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# -------------------------------------------------------------------------------------------

source "$(dirname "$0")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
launch_deepspeed_job tools/train_ppo.py "$@"
