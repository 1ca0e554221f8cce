"""The memory plan at the start of every trainer, and the one-line refusal of a plan that does
not fit.

Each trainer config has a ``memory`` group: ``--gpu-memory-gib`` (default: the device's size)
and ``--skip-memory-plan`` (for users who know better). On a GPU the plan is printed by rank 0
and a plan that does not fit stops the run with one line naming its biggest component and what
to change. Without a GPU (CPU runs) nothing blocks; the plan is printed when a size is given.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from megatron_qwen.config import ConfigError
from megatron_qwen.memory_plan.plan import GIB, MemoryPlan


@dataclasses.dataclass
class MemoryPlanConfig:
    """The memory plan checked before the model is built (group ``memory``)."""

    gpu_memory_gib: Optional[float] = None  # None: the GPU's own size (no check on CPU)
    skip_memory_plan: bool = False  # start even when the plan says it does not fit

    def validate(self) -> None:
        if self.gpu_memory_gib is not None and not self.gpu_memory_gib > 0:
            raise ConfigError(f"memory.gpu_memory_gib={self.gpu_memory_gib} must be > 0")


def device_memory_bytes() -> Optional[float]:
    """This process's GPU size in bytes, or None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def gpu_bytes(gpu_memory_gib: Optional[float]) -> Optional[float]:
    return gpu_memory_gib * GIB if gpu_memory_gib is not None else device_memory_bytes()


def check_at_start(memory: MemoryPlanConfig, make_plan: Callable[[Optional[float], bool], MemoryPlan],
                   rank: int = 0, on_gpu: Optional[bool] = None) -> Optional[MemoryPlan]:
    """Plan, print (rank 0) and refuse a plan that does not fit (ConfigError, one line).

    ``make_plan(gpu_bytes, on_gpu)`` builds the trainer's plan. Returns the plan, or None when
    skipped or when there is neither a GPU nor a given size (a CPU run: nothing to check)."""
    if memory.skip_memory_plan:
        return None
    if on_gpu is None:
        on_gpu = device_memory_bytes() is not None
    size = gpu_bytes(memory.gpu_memory_gib)
    if size is None:
        return None
    try:
        plan = make_plan(size, True)
    except ConfigError as exc:
        if on_gpu:
            raise
        if rank == 0:  # a CPU run is never stopped by its plan
            print(f"memory plan not made: {exc}", flush=True)
        return None
    if rank == 0:
        print("memory plan (--skip-memory-plan to start anyway; tools/plan_memory.py prints it):\n"
              + plan.table(), flush=True)
    if on_gpu and not plan.fits:
        raise ConfigError(f"memory plan: {plan.verdict()} (or --skip-memory-plan)")
    return plan
