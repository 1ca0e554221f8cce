"""Let megatron-core run on a CPU-only torch with gloo: the one place that does it.

Written against 0.16.1; the same redirect runs 0.19.2 (`make test-mcore-latest`). What else
differs between megatron-core versions is in ``runtime.mcore_version``.

megatron-core hard-codes CUDA in a few dozen calls (factories with ``device='cuda'``,
``torch.cuda.current_device()``, the CUDA RNG tracker, streams and events, ``Tensor.type()``
string checks). ``install()`` redirects exactly those to the CPU. It is a no-op when
``torch.cuda.is_available()``, so a GPU run never touches any of it, and it is idempotent. Whether
a process may run on CPU at all is decided before, by ``runtime.device_check``.

Every patch below names the megatron-core call that needs it. Nothing here changes numerics: CPU
tensors stay CPU tensors, collectives go through gloo. (Fixes for megatron-core's own bugs, which
apply on every device, are in ``runtime.mcore_fixes``.)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch
import torch.utils._device

_installed = False

# Factories that megatron-core calls with device='cuda' or device=torch.cuda.current_device():
# tensor_parallel/layers.py (weights), distributed/param_and_grad_buffer.py (grad buffers),
# optimizer/optimizer.py + clip_grads.py + grad_scaler.py (found_inf, norms, scale),
# pipeline_parallel/schedules.py + p2p_communication.py (token counts, shape exchange),
# dist_checkpointing/exchange_utils.py (empty_like for shard exchange).
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "randn_like",
)

# Tensor.type() names that optimizer/optimizer.py, optimizer/distrib_optimizer.py and
# optimizer/clip_grads.py compare against ('torch.cuda.FloatTensor', ...).
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def is_installed() -> bool:
    return _installed


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare CUDA ordinal, as torch.cuda.current_device() returns


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        # no pinned-memory allocator without an accelerator: utils.py's get_thd_batch_on_this_cp_rank
        # pins cu_seqlens, rope_utils.py's get_pos_emb_on_this_cp_rank its CP indices (device="cpu")
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__wrapped_cpu_compat__ = fn
    return factory


class _NullStream:
    """torch.cuda.Stream stand-in: DDP (distributed_data_parallel.py) builds a communication
    stream for overlap_grad_reduce and param_and_grad_buffer.py waits on it."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    """torch.cuda.Event stand-in: timers and the overlapped schedule plan record events."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _drop_cpu_rng_warning(record: logging.LogRecord) -> bool:
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _tensor_type(original):
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, *args, **kwargs)

    return type_


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


def install() -> bool:
    """Redirect megatron-core's CUDA calls to the CPU. Returns True when the redirect is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    # Import first: if megatron-core is missing nothing is patched.
    from megatron.core.tensor_parallel import random as mc_random

    cuda = torch.cuda
    # Device placement: layers.py/mappings.py/param_and_grad_buffer.py pass
    # device=torch.cuda.current_device(); rotary_pos_embedding.py does .to(current_device()).
    cuda.current_device = lambda: torch.device("cpu")
    # torch's `with torch.device(...)` context recognises factories by identity from a set it builds
    # (and caches) on first use: build it now, from the real factories, before wrapping them.
    torch.utils._device._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _cpu_factory(getattr(torch, name)))
    # language_module.py (weight.data.cuda()), grad_scaler.py load, distrib_optimizer.py
    # send_tensor.cuda(), exchange_utils.py shard loading.
    torch.Tensor.cuda = _tensor_cuda
    torch.Tensor.type = _tensor_type(torch.Tensor.type)

    # Synchronisation, streams and events: p2p_communication.py (synchronize after batched
    # isend/irecv), parallel_state.py (barriers), DDP overlap_grad_reduce (Stream, stream(),
    # default_stream().wait_stream), timers/schedule plans (Event).
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    # utils.nvtx_range_push/pop and schedules (config.enable_nvtx / profiling paths).
    cuda.nvtx.range_push = lambda msg: None
    cuda.nvtx.range_pop = lambda: None
    cuda.nvtx.range = lambda msg, *a, **k: contextlib.nullcontext()
    # Memory reports: memory_allocated() & co. already return 0 on a CPU build, but
    # reset_peak_memory_stats (called between iterations by training loggers) raises.
    cuda.reset_peak_memory_stats = lambda device=None: None

    # RNG: tensor_parallel/random.py's CudaRNGStatesTracker.add/fork and
    # model_parallel_cuda_manual_seed use torch.cuda.{get_rng_state, manual_seed} and the module
    # helpers _get_cuda_rng_state/_set_cuda_rng_state (also used by activation recompute to
    # replay dropout). On CPU the "device" generator is the CPU default generator.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.random.set_rng_state = cuda.set_rng_state
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, a no-op without CUDA: left alone.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.manual_seed = cuda.manual_seed

    mc_random._get_cuda_rng_state = _cpu_get_rng_state
    mc_random._set_cuda_rng_state = _cpu_set_rng_state
    # CudaRNGStatesTracker.fork warns when the CPU state moved inside the fork; on CPU the forked
    # generator *is* the CPU generator, so that warning would fire on every dropout call.
    logging.getLogger(mc_random.__name__).addFilter(_drop_cpu_rng_warning)
    # layers.py advises CUDA_DEVICE_MAX_CONNECTIONS=1 for async TP all-reduce: a CUDA stream setting
    # with no meaning on CPU (on GPU nodes slurm/common.sh exports it and the advice stays).
    warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended to set "
                            "the environment variable CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)

    _installed = True
    return True

