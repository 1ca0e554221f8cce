"""The trainer on megatron-core: config groups, optimizer + schedule, checkpoints, metrics, loop."""

from megatron_qwen.training.config import (CheckpointConfig, DataConfig, LoggingConfig, OptimConfig,
                                           PretrainConfig, TrainConfig)

__all__ = ["PretrainConfig", "DataConfig", "OptimConfig", "CheckpointConfig", "LoggingConfig",
           "TrainConfig"]
