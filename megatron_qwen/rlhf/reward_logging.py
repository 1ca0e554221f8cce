"""Rank-0 metrics for the reward model: one stdout line, TensorBoard scalars, wandb (offline)."""

from __future__ import annotations

import os
from typing import Optional


class MetricsLogger:
    """Writes ``{name: value}`` records under a prefix (``train``/``test``) to every sink set up."""

    def __init__(self, logging_cfg, config_dict: Optional[dict] = None):
        self.tb = None
        self.wandb = None
        if logging_cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(logging_cfg.tensorboard_dir)
        if logging_cfg.wandb_project and logging_cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=logging_cfg.wandb_project, name=logging_cfg.wandb_name,
                                    mode=logging_cfg.wandb_mode, config=config_dict or {},
                                    dir=logging_cfg.tensorboard_dir or None)

    def log(self, prefix: str, metrics: dict, step: int, total_steps: int) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        text = " | ".join(_fmt(k, v) for k, v in numbers.items() if k != "step")
        print(f"[{prefix}] step {step}/{total_steps} | {text}", flush=True)
        for key, value in numbers.items():
            if key == "step":
                continue
            if self.tb is not None:
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numbers.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(key: str, value) -> str:
    if isinstance(value, int):
        return f"{key} {value}"
    if key == "lr":
        return f"{key} {value:.2e}"
    if key.endswith("_per_s"):
        return f"{key} {value:.1f}"
    return f"{key} {value:.4f}"
