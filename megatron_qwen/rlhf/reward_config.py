"""Settings of the reward-model trainer: one dataclass group per concern, loaded by config.py.

PMP and fine-tuning are the same command with a different ``--train-data-path`` and ``--lr``
(``examples/rm_pmp_7b.yaml``, ``examples/rm_finetune_7b.yaml``). Flag spellings follow
Megatron-LM where one exists (``--lr``, ``--global-batch-size``, ``--seq-length``, ``--save``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_qwen.config import ConfigError
from megatron_qwen.memory_plan.start_check import MemoryPlanConfig
from megatron_qwen.rlhf.deepspeed_config import DeepSpeedConfig


@dataclasses.dataclass
class RMModelConfig:
    """Where the backbone comes from (group ``model``)."""

    model_path: str = ""  # HF qwen2 directory: pretrained/SFT model, or an RM export to continue
    tokenizer_path: Optional[str] = None  # .tiktoken file or directory; None: model_path's, else packaged

    def validate(self) -> None:
        if not self.model_path:
            raise ConfigError("model.model_path is required (a Hugging Face qwen2 directory)")


@dataclasses.dataclass
class RMDataConfig:
    """Comparison pairs (group ``data``)."""

    train_data_path: str = ""  # JSONL: {"prompt": [messages], "chosen": str, "rejected": str}
    test_data_path: Optional[str] = None  # held-out pairs for pairwise accuracy and reward stats
    seq_length: int = 2048  # longer pairs are truncated by the preference data's rule

    def validate(self) -> None:
        if not self.train_data_path:
            raise ConfigError("data.train_data_path is required")
        if self.seq_length < 8:
            raise ConfigError(f"data.seq_length={self.seq_length} is too short")


@dataclasses.dataclass
class RMOptimConfig:
    """Optimizer, schedule and batch (group ``optim``); the report: constant 3e-6, batch 64, 1 epoch."""

    lr: float = 3e-6  # learning rate (constant after warm-up)
    lr_warmup_iters: int = 0  # linear warm-up, then constant
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 1.0  # clip the global gradient norm to this
    global_batch_size: int = 64  # pairs per optimizer step, over all ranks
    micro_batch_size: int = 1  # pairs per rank per forward (2 sequences each)
    epochs: int = 1  # passes over the training pairs
    train_iters: Optional[int] = None  # stop after this many steps (None: all epochs)
    seed: int = 1234  # seed of the head init and the pair order

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("optim.global_batch_size and optim.micro_batch_size must be >= 1")
        if self.epochs < 1:
            raise ConfigError("optim.epochs must be >= 1")
        if self.train_iters is not None and self.train_iters < 1:
            raise ConfigError("optim.train_iters must be >= 1")


@dataclasses.dataclass
class RMCheckpointConfig:
    """Training state (DeepSpeed checkpoints) and the HF-style export (group ``checkpoint``)."""

    save: Optional[str] = None  # DeepSpeed checkpoints: DIR/global_stepN/, DIR/latest
    save_interval: int = 0  # steps between checkpoints (0: only at the end)
    load: Optional[str] = None  # resume from DIR/latest (same data and batch settings)
    ckpt_step: Optional[int] = None  # resume from DIR/global_stepN instead of DIR/latest
    export_dir: Optional[str] = None  # HF backbone + head + reward stats (default: SAVE/export)

    def validate(self) -> None:
        if self.save_interval < 0:
            raise ConfigError("checkpoint.save_interval must be >= 0")
        if self.ckpt_step is not None and not self.load:
            raise ConfigError("checkpoint.ckpt_step needs checkpoint.load")
        if not self.save and not self.export_dir:
            raise ConfigError("set checkpoint.save or checkpoint.export_dir: the run would keep nothing")


@dataclasses.dataclass
class RMLoggingConfig:
    """stdout, TensorBoard, wandb (group ``logging``)."""

    log_interval: int = 10  # steps between stdout/TensorBoard lines
    eval_interval: int = 0  # steps between test-set evaluations (0: only at the end)
    tensorboard_dir: Optional[str] = None  # write TensorBoard events here
    wandb_project: Optional[str] = None  # None: no wandb
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_name: Optional[str] = None  # the wandb run name

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ConfigError("logging.log_interval must be >= 1")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logging.wandb_mode={self.wandb_mode!r}: choose offline, online or disabled")


@dataclasses.dataclass
class RewardModelConfig:
    """Train a Qwen reward model on comparison pairs (PMP or fine-tuning) with DeepSpeed ZeRO."""

    model: RMModelConfig = dataclasses.field(default_factory=RMModelConfig)
    data: RMDataConfig = dataclasses.field(default_factory=RMDataConfig)
    optim: RMOptimConfig = dataclasses.field(default_factory=RMOptimConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    checkpoint: RMCheckpointConfig = dataclasses.field(default_factory=RMCheckpointConfig)
    logging: RMLoggingConfig = dataclasses.field(default_factory=RMLoggingConfig)
    memory: MemoryPlanConfig = dataclasses.field(default_factory=MemoryPlanConfig)

    def validate(self) -> None:
        if self.optim.global_batch_size % self.optim.micro_batch_size:
            raise ConfigError(f"optim.global_batch_size={self.optim.global_batch_size} is not a "
                              f"multiple of optim.micro_batch_size={self.optim.micro_batch_size}")
