"""Refuse weights that are NaN or infinite, wherever checkpoint tensors are read.

A NaN weight makes every loss NaN from the first step and survives any conversion untouched, so
the converters and the model loaders stop at the first non-finite tensor with one line naming
the file and the tensor, before anything is written or trained.
"""

from __future__ import annotations

from typing import Mapping

import torch

from megatron_qwen.checkpoint.mapping import CheckpointError


def require_finite(tensor: torch.Tensor, name: str, where) -> torch.Tensor:
    """``tensor`` itself when every value is finite (integer tensors always are)."""
    if tensor.is_floating_point() or tensor.is_complex():
        bad = int(tensor.numel() - torch.isfinite(tensor).sum())
        if bad:
            raise CheckpointError(f"{where}: tensor {name} has {bad} non-finite value(s) (NaN/Inf) "
                                  f"of {tensor.numel()}; refusing a corrupt checkpoint")
    return tensor


def require_finite_state(state, where, prefix: str = "") -> None:
    """:func:`require_finite` on every tensor of a (nested) state dict, named by its dotted key."""
    if isinstance(state, torch.Tensor):
        require_finite(state, prefix, where)
    elif isinstance(state, Mapping):
        for key, value in state.items():
            require_finite_state(value, where, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            require_finite_state(value, where, f"{prefix}.{i}" if prefix else str(i))
