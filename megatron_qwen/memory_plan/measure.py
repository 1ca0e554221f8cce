"""The measured peak of live tensor allocations in a block of code, on CPU (or GPU).

On CPU there is no ``torch.cuda.max_memory_allocated``: the profiler's memory events are the
allocations and frees that go through c10's allocator (every tensor storage), with their sizes
and the allocator's running total. That total is what this reads. The profiler reports events
only from threads that carry its state, and a tensor whose last reference drops on another
thread (gloo's worker threads free ZeRO-3's all-gather outputs when a collective finishes after
the main thread let go) would never be subtracted: the sum of the recorded events then drifts
up, by a different amount each run. With c10's ``caffe2_report_cpu_memory_usage`` flag set for
the block, the allocator's total counts every thread, so the peak of that total is the peak of
tensors alive in the process. This counts tensors, not the process's resident set (no Python
objects, no allocator caches, no gloo buffers), which is what the plan predicts. Tensors alive
before the block are not counted: start it before the model is built, or add the model's
:func:`tensor_bytes` and call :func:`track_cpu_allocations` before building it, so that the
model's tensors the block frees (ZeRO-3 replaces them by partitions) come off the total. A
tensor another thread both allocates and frees between two recorded events is missed;
transformers' weight loading runs on a thread pool, so run it before the block.
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

        self._flag = _all_threads_flag()
        self._flag_was = self._flag.value
        self._flag.value = True
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
        self._flag.value = self._flag_was
        from torch._C._profiler import _EventType

        events = sorted((n.start_time_ns, n.extra_fields.alloc_size, n.extra_fields.total_allocated)
                        for n in _walk(self._prof.profiler.kineto_results.experimental_event_tree())
                        if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu")
        self.largest = 0
        if not events:  # the block allocated and freed nothing
            return False
        _, first_size, first_total = events[0]
        start = first_total - first_size  # the allocator's total just before the first event
        self.peak = max(0, max(total for _, _, total in events) - start)
        self.end = events[-1][2] - start
        self.largest = max(size for _, size, _ in events)
        return False


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def track_cpu_allocations() -> None:
    """From now on c10's CPU allocator keeps its running total (and each tensor's size) on every
    thread, so tensors allocated before a :class:`PeakAllocations` block and freed inside it are
    subtracted from its total. It stays on for the rest of the process (one locked map update
    per allocation)."""
    _all_threads_flag().value = True


def _all_threads_flag():
    """c10's ``FLAGS_caffe2_report_cpu_memory_usage``: while set, the CPU allocator's running
    total (reported with each profiler memory event) includes frees on every thread."""
    import ctypes
    import os

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    return ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage")


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a model's parameters and buffers),
    with each ZeRO-3 parameter's partition (``ds_tensor``), which holds its data."""
    seen = {}
    for t in tensors:
        for held in (t, getattr(t, "ds_tensor", None)):
            if held is not None:
                storage = held.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def peak_allocations():
    m = PeakAllocations()
    with m:
        yield m
