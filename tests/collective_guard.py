"""Make a CPU run see the collectives that would get a CPU tensor on a GPU node.

On a GPU node the process group is NCCL, which reduces device tensors only. A tensor made by a
factory (``torch.tensor``, ``zeros``, ``arange``...) without a ``device`` lands on the CPU there,
and so does everything computed from such tensors alone; ``.to(device)`` / ``.cuda()`` moves it.
On a CPU run every tensor is a CPU tensor, so this guard keeps that fact as a mark:

- a factory called without ``device`` marks its result, and so do ``from_numpy`` and ``.cpu()``;
- any other op marks its result when every tensor it was given is marked (what CPU-only inputs
  give; ``*_like`` and ``new_tensor`` of a device tensor are not marked);
- ``.to(...)``, ``.cuda()`` with a device clear the mark (also on the tensor itself when ``to``
  returns it unchanged, as it does on the CPU);
- ``torch.cat`` / ``torch.stack`` of marked and unmarked tensors raise: CUDA refuses that mix too.

A tensor made with ``device="cpu"`` named explicitly counts as on the device (in a CPU run the
compute device is the CPU). Tensors made where no Python torch call is seen (inside C++, in
DataLoader worker processes) carry no mark: the guard misses those.

The collectives of ``torch.distributed`` raise :class:`OffDeviceCollective`, naming the caller's
file and line, when given a marked tensor. They also count their calls by name
(``guard.calls``), which tests use to count the collectives of a step.
"""

from __future__ import annotations

import collections
import functools
import traceback

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary


def _real(fn):
    """The torch function itself (megatron_qwen.runtime.cpu_compat wraps some factories)."""
    return getattr(fn, "__wrapped_cpu_compat__", fn)


FACTORIES = {_real(f) for f in (torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty,
                                torch.full, torch.arange, torch.rand, torch.randn, torch.randint,
                                torch.randperm, torch.linspace, torch.logspace, torch.eye,
                                torch.empty_strided)}
ALWAYS_CPU = {torch.from_numpy, torch.frombuffer, torch.Tensor.cpu}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}
JOINS = {torch.cat, torch.stack, torch.concat, torch.concatenate, torch.hstack, torch.vstack}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single",
               "all_reduce_coalesced", "_all_gather_base", "_reduce_scatter_base")


class OffDeviceCollective(AssertionError):
    """A collective was handed a tensor that would be on the CPU on a GPU node."""


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _call_site() -> str:
    """The innermost frame outside torch, this file and the CPU redirect's factory wrappers."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "/torch/" not in name and not name.endswith(("collective_guard.py", "cpu_compat.py")):
            return f"{name}:{frame.lineno} ({frame.name})"
    return "?"


class CollectiveGuard(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self._marked = WeakIdKeyDictionary()  # tensor -> where its CPU-ness came from
        self.calls: collections.Counter = collections.Counter()
        self._originals: dict = {}

    # -- marks
    def is_marked(self, t: torch.Tensor) -> bool:
        return t in self._marked

    def _mark(self, out, why: str) -> None:
        for t in _tensors(out):
            self._marked[t] = why

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        original = getattr(func, "guarded_original", None)
        if original is not None:  # a collective re-dispatched to this mode: already checked
            return original(*args, **kwargs)
        inputs = [t for t in _tensors((args, kwargs))]
        if func in JOINS:
            marks = {self.is_marked(t) for t in inputs}
            if len(marks) == 2:
                raise OffDeviceCollective(f"torch.{func.__name__} of CPU and device tensors at "
                                          f"{_call_site()} (CUDA refuses the mix)")
        out = func(*args, **kwargs)
        if func in FACTORIES:
            if kwargs.get("device") is None:
                self._mark(out, f"{func.__name__} without a device at {_call_site()}")
        elif func in ALWAYS_CPU:
            self._mark(out, f"{func.__name__} at {_call_site()}")
        elif func in MOVES:
            if self._names_device(func, args[1:], kwargs):
                for t in _tensors(out):
                    self._marked.pop(t, None)
            elif self.is_marked(args[0]):
                self._mark(out, self._marked[args[0]])
        elif inputs and all(self.is_marked(t) for t in inputs):
            ids = {id(t) for t in inputs}
            fresh = [t for t in _tensors(out) if id(t) not in ids]  # in-place ops keep their mark
            self._mark(fresh, self._marked[inputs[0]])
        return out

    @staticmethod
    def _names_device(func, args, kwargs) -> bool:
        if func is torch.Tensor.cuda:
            return True
        if "device" in kwargs:
            return kwargs["device"] is not None
        first = args[0] if args else None
        return isinstance(first, (torch.device, str, int)) or isinstance(first, torch.Tensor)

    # -- collectives
    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            self.calls[name] += 1
            for t in _tensors((args, kwargs)):
                if self.is_marked(t):
                    raise OffDeviceCollective(
                        f"torch.distributed.{name} at {_call_site()} got a tensor that is on the CPU "
                        f"on a GPU node (NCCL refuses it): {self._marked[t]}")
            return fn(*args, **kwargs)

        guarded.guarded_original = fn
        return guarded

    def __enter__(self):
        for name in COLLECTIVES:
            fn = getattr(c10d, name, None)
            if fn is None:
                continue
            self._originals[name] = (fn, getattr(dist, name, None))
            wrapped = self._wrap(name, fn)
            setattr(c10d, name, wrapped)
            if hasattr(dist, name):
                setattr(dist, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, (c10d_fn, dist_fn) in self._originals.items():
            setattr(c10d, name, c10d_fn)
            if dist_fn is not None:
                setattr(dist, name, dist_fn)
        self._originals.clear()
        return super().__exit__(*exc)
