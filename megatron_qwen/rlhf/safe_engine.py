"""DeepSpeed engine checkpoints read without running code from them.

DeepSpeed 0.19.8's ``TorchCheckpointEngine.load`` unpickles ``mp_rank_*_model_states.pt`` and
``*_optim_states.pt`` with ``torch.load(weights_only=False)``, so a planted file runs code on
``load_checkpoint`` (the reward-model trainer's ``--load``, PPO's resume). The engine given here
loads them with ``weights_only=True`` and only the DeepSpeed classes those states hold.
"""

from __future__ import annotations

import torch

from megatron_qwen.checkpoint.weights_only import torch_load


def deepspeed_globals() -> list:
    """The DeepSpeed classes in its engine states (found with torch's
    ``get_unsafe_globals_in_checkpoint`` on the RM trainer's ZeRO-0/1/2/3 checkpoints; the
    dynamic loss scaler is fp16's)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine(engine) -> None:
    """Give a DeepSpeed engine a checkpoint engine that loads with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_globals()):
                return torch_load(path, path, map_location=map_location)

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed engine has checkpoint engine {type(current).__name__}; "
                           "safe loading is written for TorchCheckpointEngine")
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)  # the same settings (serialization, name)
    engine.checkpoint_engine = safe
