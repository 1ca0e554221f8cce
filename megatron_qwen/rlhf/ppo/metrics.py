"""Per-step PPO metrics to stdout, TensorBoard, wandb (offline unless configured) and JSONL.

Only rank 0 writes; every value passed in is already reduced over ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from megatron_qwen.rlhf.ppo.config import TrainConfig

# the keys printed on the one-line stdout summary, in this order
STDOUT_KEYS = ("reward/raw", "reward/normalized", "kl", "entropy", "loss/policy", "loss/value",
               "clipfrac/policy", "clipfrac/value", "approx_kl", "response/length",
               "response/truncated_share", "time/generate", "time/score", "time/train", "tokens_per_s")


class MetricsLogger:
    def __init__(self, cfg: TrainConfig, run_config: dict, rank: int):
        self.rank, self.cfg = rank, cfg
        self.tb = self.wandb = None
        if rank != 0:
            return
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.tensorboard_dir)
        if cfg.wandb_project and cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
            self.wandb = wandb.init(project=cfg.wandb_project, config=run_config, mode=cfg.wandb_mode,
                                    dir=cfg.tensorboard_dir or None)
        self.jsonl: Optional[Path] = Path(cfg.metrics_jsonl) if cfg.metrics_jsonl else None
        if self.jsonl:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        if step % self.cfg.log_interval == 0:
            parts = [f"step {step}"] + [f"{k} {metrics[k]:.4g}" for k in STDOUT_KEYS if k in metrics]
            print(" | ".join(parts), flush=True)
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.jsonl:
            with self.jsonl.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
