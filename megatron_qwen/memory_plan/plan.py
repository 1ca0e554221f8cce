"""A memory plan: the bytes per GPU of each component, the peak they add up to, fit or not.

Components are either resident (parameters, gradients, optimizer state, communication buffers:
held from start to end) or transient in one phase of a step (activations in training, the KV
cache in generation...). The peak is the resident sum plus the largest phase: phases do not
overlap in time (PPO generates, then scores, then trains).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

GIB = 1024 ** 3
# What a GPU gives beyond the plan's tensors: the CUDA context, NCCL's buffers and the caching
# allocator's fragmentation are not tensors; the plan must leave this much free.
CONTEXT_BYTES = 1 * GIB
FRAGMENTATION = 0.10


@dataclasses.dataclass
class Component:
    name: str  # "actor optimizer state", "activations", ...
    bytes: float
    how: str  # the formula in words (shown in the table)
    fix: str  # what shrinks it (named in the no-fit line)
    phase: Optional[str] = None  # None: resident; else the phase it lives in


@dataclasses.dataclass
class MemoryPlan:
    title: str  # "pretrain qwen_7b: TP=2 PP=1 DP=16, distributed optimizer, bf16"
    components: list
    gpu_bytes: Optional[float] = None  # None: no GPU size known (plan printed, fit not judged)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def resident(self) -> float:
        return sum(c.bytes for c in self.components if c.phase is None)

    def phase_bytes(self) -> dict:
        out: dict = {}
        for c in self.components:
            if c.phase is not None:
                out[c.phase] = out.get(c.phase, 0.0) + c.bytes
        return out

    @property
    def peak_phase(self) -> Optional[str]:
        phases = self.phase_bytes()
        return max(phases, key=phases.get) if phases else None

    @property
    def peak(self) -> float:
        phases = self.phase_bytes()
        return self.resident + (max(phases.values()) if phases else 0.0)

    @property
    def usable(self) -> Optional[float]:
        if self.gpu_bytes is None:
            return None
        return self.gpu_bytes * (1 - FRAGMENTATION) - CONTEXT_BYTES

    @property
    def fits(self) -> Optional[bool]:
        return None if self.usable is None else self.peak <= self.usable

    def biggest(self) -> Component:
        """The largest component counted in the peak (resident, or in the peak phase)."""
        peak = self.peak_phase
        counted = [c for c in self.components if c.phase is None or c.phase == peak]
        return max(counted, key=lambda c: c.bytes)

    def verdict(self) -> str:
        """One line: fits (with the margin), does not fit (biggest component, what to change),
        or no GPU size to judge by."""
        gib = self.peak / GIB
        if self.fits is None:
            return f"peak {gib:.1f} GiB per GPU (no GPU memory size given: fit not checked)"
        usable = self.usable / GIB
        if self.fits:
            return (f"fits: peak {gib:.1f} GiB of {usable:.1f} GiB usable "
                    f"({self.gpu_bytes / GIB:.0f} GiB GPU)")
        big = self.biggest()
        return (f"does not fit: peak {gib:.1f} GiB > {usable:.1f} GiB usable of a "
                f"{self.gpu_bytes / GIB:.0f} GiB GPU; biggest: {big.name} "
                f"{big.bytes / GIB:.1f} GiB: {big.fix}")

    def table(self) -> str:
        """The per-component table (markdown), with the peak and the verdict."""
        lines = [f"**{self.title}**", "",
                 "| component | phase | GiB/GPU | how |", "|---|---|---:|---|"]
        for c in self.components:
            lines.append(f"| {c.name} | {c.phase or 'resident'} | {_gib(c.bytes)} | {c.how} |")
        phases = self.phase_bytes()
        peak = self.peak_phase
        lines.append(f"| **peak** | {peak or 'resident'} | **{_gib(self.peak)}** | resident "
                     f"{_gib(self.resident)} + largest phase"
                     + (f" ({peak} {_gib(phases[peak])})" if peak else "") + " |")
        lines += ["", self.verdict()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _gib(nbytes: float) -> str:
    """GiB with two decimals, more for the small sizes of CPU test models."""
    return f"{nbytes / GIB:.2f}" if nbytes >= 0.1 * GIB else f"{nbytes / GIB:.5f}"
