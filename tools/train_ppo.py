#!/usr/bin/env python
"""PPO on four DeepSpeed engines (actor, critic, reference, reward): report section 3.2.2.

One node:   deepspeed --num_gpus 8 tools/train_ppo.py --config examples/ppo_7b.yaml [--flag value ...]
            torchrun --nproc-per-node 8 tools/train_ppo.py --config examples/ppo_7b.yaml
CPU:        torchrun --nproc-per-node 2 tools/train_ppo.py --config examples/ppo_tiny_cpu.yaml
Many nodes: slurm/ppo_7b.sh, slurm/ppo_14b.sh.  All settings: tools/train_ppo.py --help
"""

from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]

    from megatron_qwen.config import ConfigError, load_config
    from megatron_qwen.rlhf.ppo.config import PPOTrainConfig

    cfg = load_config(PPOTrainConfig, argv, description=__doc__)

    import torch.distributed as dist

    from megatron_qwen.memory_plan import check_trainer_start
    from megatron_qwen.rlhf.deepspeed_config import init_distributed
    from megatron_qwen.rlhf.ppo.checkpoint import CheckpointError
    from megatron_qwen.rlhf.ppo.prompts import PromptError
    from megatron_qwen.rlhf.ppo.ptx import PtxError
    from megatron_qwen.rlhf.ppo.trainer import PPOTrainer

    try:
        init_distributed(cfg.engines.bf16)  # a missing GPU where one is expected: one line
        check_trainer_start(cfg, dist.get_world_size(), dist.get_rank())  # before any model loads
        trainer = PPOTrainer(cfg)
        trainer.fit()
    except (ConfigError, PromptError, PtxError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
