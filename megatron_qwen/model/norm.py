"""RMSNorm (report 2.3: pre-norm, eps 1e-6) that works with sequence parallelism.

megatron-core's local ``WrappedTorchNorm`` refuses ``sequence_parallel``; the TE/Apex norms need
a GPU. Under sequence parallelism each TP rank normalises a different slice of the sequence, so
the weight's gradient is partial: marking it ``sequence_parallel`` makes megatron-core's
``finalize_model_grads`` all-reduce it across the TP group."""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in FP32 and cast back (as HF Qwen2RMSNorm)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        # With use_cpu_initialization no device is named, so a torch.device("meta") context
        # (count_parameters) builds it without allocating.
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)
