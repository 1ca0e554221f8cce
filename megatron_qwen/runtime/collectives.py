"""Scalar reductions over a process group, on the device that group communicates on.

A tensor built from Python numbers with no device lives on the CPU. Gloo reduces it; NCCL (the
group DeepSpeed and megatron-core create on GPUs) refuses it ("No backend type associated with
device type cpu"). Every reduction of plain numbers in the package goes through here, so the
tensor is built on the caller's compute device (``engine.device``, ``runtime.device()``).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_multi_process(group=None) -> bool:
    """True when a collective over ``group`` involves more than this process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_scalars(values: Sequence[float], *, device: torch.device | str, op: str = "sum",
                       group=None) -> List[float]:
    """``values`` reduced element-wise over ``group`` (float64: integer counts stay exact up to
    2**53); the values themselves in a single process."""
    if op not in _OPS:
        raise ValueError(f"all_reduce_scalars: op={op!r}, choose one of {', '.join(_OPS)}")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if is_multi_process(group):
        dist.all_reduce(t, op=_OPS[op], group=group)
    return t.tolist()
