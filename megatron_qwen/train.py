"""Pretraining (and SFT) entry point: ``python -m megatron_qwen.train --config RECIPE.yaml [--flag v]``.

The story, top to bottom: read the config, start the process groups, train. Everything else is
in ``megatron_qwen/training/``. Launch one process per GPU with torchrun (see slurm/).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_qwen.config import ConfigError, load_config
from megatron_qwen.training.config import PretrainConfig


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = load_config(PretrainConfig, argv, description=PretrainConfig.__doc__)
    import torch

    from megatron_qwen.memory_plan import check_trainer_start
    from megatron_qwen.runtime import destroy, init_distributed
    from megatron_qwen.training.loop import TrainingStopped, train

    try:
        init_distributed(cfg.parallel, seed=cfg.train.seed, bf16=cfg.optim.bf16)
        cfg.check_world(torch.distributed.get_world_size())
        check_trainer_start(cfg, torch.distributed.get_world_size(), torch.distributed.get_rank())
        train(cfg)
    except ConfigError as exc:  # one line, exit status 2 (as for a bad flag)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    except TrainingStopped:
        raise SystemExit(3)
    finally:
        destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
