"""``tools/plan_memory.py``: the memory plan of a recipe, printed before anything is launched.

    tools/plan_memory.py --config examples/ppo_7b.yaml --nodes 4 --gpu-memory-gib 80
    tools/plan_memory.py --config examples/pretrain_7b.yaml --world-size 32 --micro-batch-size 4

The trainer is told by the recipe's groups (``rollout``: PPO, ``deepspeed``: reward model, else
pretraining/SFT); every other flag is the trainer's own (``--micro-batch-size``,
``--actor-zero-stage``...). Exit status: 0 fits, 1 does not fit, 2 a bad setting.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

from megatron_qwen.config import ConfigError, load_config



def trainer_config_class(recipe: dict):
    """The config class of the trainer a recipe is for."""
    if "rollout" in recipe or "engines" in recipe:
        from megatron_qwen.rlhf.ppo.config import PPOTrainConfig

        return PPOTrainConfig
    if "deepspeed" in recipe:
        from megatron_qwen.rlhf.reward_config import RewardModelConfig

        return RewardModelConfig
    from megatron_qwen.training.config import PretrainConfig

    return PretrainConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plan_memory.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the recipe (YAML)")
    p.add_argument("--world-size", type=int, help="GPUs in all (or --nodes)")
    p.add_argument("--nodes", type=int, help="nodes of --gpus-per-node GPUs")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (with --nodes)")
    p.add_argument("--model-preset", help="shape of the HF models of an RM/PPO recipe whose "
                   "directories are not there yet (qwen_1p8b, qwen_7b, qwen_14b)")
    p.add_argument("--cpu", action="store_true", help="plan the fp32 run a CPU machine makes")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = _parser().parse_known_args(argv)
    from megatron_qwen.memory_plan import plan_for
    from megatron_qwen.memory_plan.start_check import gpu_bytes

    path = Path(args.config)
    if not path.is_file():
        print(f"error: --config {path}: no such file", file=sys.stderr)
        return 2
    cls = trainer_config_class(yaml.safe_load(path.read_text()) or {})
    try:
        cfg = load_config(cls, ["--config", str(path), *rest])
    except SystemExit as exc:  # load_config's one-line errors
        print(exc, file=sys.stderr)
        return 2
    world = args.world_size or (args.nodes * args.gpus_per_node if args.nodes else None)
    if world is None and os.environ.get("WORLD_SIZE"):
        world = int(os.environ["WORLD_SIZE"])
    if world is None or world < 1:
        print("error: say how many GPUs: --world-size N, or --nodes N [--gpus-per-node 8]",
              file=sys.stderr)
        return 2
    try:
        size = gpu_bytes(cfg.memory.gpu_memory_gib)
        plan = plan_for(cfg, world, size, on_gpu=not args.cpu, model_preset=args.model_preset)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.table())
    if size is None:
        print("error: no GPU here to read its memory size from: pass --gpu-memory-gib "
              "(e.g. 80 for an 80 GB H100) to check the fit", file=sys.stderr)
        return 2
    return 0 if plan.fits else 1
