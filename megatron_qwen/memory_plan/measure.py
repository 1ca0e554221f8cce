"""The measured peak of live tensor allocations in a block of code, on CPU (or GPU).

On CPU there is no ``torch.cuda.max_memory_allocated``: the profiler's memory events are every
allocation and free that goes through c10's allocator (every tensor storage), with its size and
time. Their running sum, in time order, is the bytes of tensors alive; its maximum is the peak.
This counts tensors, not the process's resident set (no Python objects, no allocator caches, no
gloo buffers), which is what the plan predicts. Tensors alive before the block are not counted:
start it before the model is built, or add the model's :func:`tensor_bytes`. The
profiler records the threads it runs on: code that allocates on a thread pool (transformers'
weight loading) must run before the block.
"""

from __future__ import annotations

import contextlib

import torch


class PeakAllocations:
    """``with PeakAllocations() as m: ...``; then ``m.peak`` (bytes above the start),
    ``m.end`` (bytes still alive at the end) and, on CPU, ``m.largest`` (the largest single
    allocation). On a GPU it reads the CUDA allocator instead (``largest`` stays None)."""

    def __init__(self):
        self.peak = 0
        self.end = 0
        self.largest = None
        self._prof = None

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                             record_shapes=False, with_stack=False)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self._prof is None:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            self.end = torch.cuda.memory_allocated() - self._base
            return False
        self._prof.__exit__(*exc)
        events = [(e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        events.sort()
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak, self.end = peak, live
        self.largest = max((nbytes for _, nbytes in events), default=0)
        return False


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a model's parameters and buffers)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def peak_allocations():
    m = PeakAllocations()
    with m:
        yield m
