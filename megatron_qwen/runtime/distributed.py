"""Process-group setup: torch.distributed from the torchrun environment, then megatron-core's
model-parallel groups and RNG seeds. One call for every entry point, GPU or CPU."""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import tempfile

import numpy as np
import torch

from megatron_qwen.config import ConfigError, ParallelConfig
from megatron_qwen.runtime import cpu_compat, device_check, mcore_fixes


@contextlib.contextmanager
def world_of_one(model_parallel: bool = False):
    """A throwaway one-process gloo group for single-process tools and tests (megatron-core's
    checkpointing and datasets ask torch.distributed for ranks); the existing group, untouched,
    when one is initialised. ``model_parallel`` also sets up TP=PP=1 groups for model building.
    Device-agnostic work only (checkpoint conversion, shape counts): no GPU is asked for."""
    cpu_compat.install()
    mcore_fixes.apply()
    if torch.distributed.is_initialized():
        yield
        return
    from megatron.core import parallel_state as ps

    with tempfile.TemporaryDirectory() as tmp:
        store = torch.distributed.FileStore(os.path.join(tmp, "store"), 1)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            if model_parallel:
                ps.initialize_model_parallel(1, 1)
            yield
        finally:
            if model_parallel:
                ps.destroy_model_parallel()
            torch.distributed.destroy_process_group()


def device() -> torch.device:
    """The device this process computes on: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _init_process_group(timeout_minutes: int) -> None:
    if torch.distributed.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    kwargs = {}
    if "MASTER_ADDR" not in os.environ:  # a plain `python script.py`: a world of one
        if world_size != 1:
            raise ConfigError(f"WORLD_SIZE={world_size} but MASTER_ADDR is unset: launch with torchrun")
        kwargs["store"] = torch.distributed.HashStore()  # in-memory rendezvous, no port
    torch.distributed.init_process_group(
        backend=backend,
        world_size=world_size,
        rank=rank,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        **kwargs,
    )


def check_world(parallel_cfg: ParallelConfig, world_size: int) -> None:
    """The layout must tile the world: TP x PP (x CP) divides the number of processes."""
    tp = parallel_cfg.tensor_model_parallel_size
    pp = parallel_cfg.pipeline_model_parallel_size
    cp = parallel_cfg.context_parallel_size
    if world_size % (tp * pp * cp):
        cp_text = f" x context_parallel_size={cp}" if cp > 1 else ""
        raise ConfigError(
            f"tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp}{cp_text} does not "
            f"divide the world size {world_size}"
        )


def seed_everything(seed: int) -> None:
    """Seed python/numpy/torch and megatron-core's model-parallel RNG tracker.

    Megatron's convention: the default generator gets ``seed + 100 * pp_rank`` (identical across
    TP and DP ranks of a stage), the tracker's tensor-parallel stream differs per TP rank. On CPU
    the tracker forks the CPU generator (cpu_compat)."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def init_distributed(parallel_cfg: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30,
                     bf16: bool = False) -> None:
    """Initialise torch.distributed (nccl on GPU, gloo on CPU; a single process works too),
    megatron-core's model-parallel groups and the RNG seeds. Call once, before building a model.
    ``bf16``: the run asks for BF16, so a GPU is expected (``device_check``)."""
    parallel_cfg.validate()
    mcore_fixes.apply()  # megatron-core's own bugs: every device
    if not device_check.use_gpu(bf16=bf16):  # raises when a GPU was expected and is missing
        cpu_compat.install()  # before megatron-core allocates anything
        if bf16 and os.environ.get("RANK", "0") == "0":
            print(f"{device_check.DEVICE_ENV}=cpu: --bf16 runs in FP32 on CPU", flush=True)
    _init_process_group(timeout_minutes)
    check_world(parallel_cfg, torch.distributed.get_world_size())

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vpp = parallel_cfg.virtual_pipeline_model_parallel_size
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        context_parallel_size=parallel_cfg.context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)


def destroy() -> None:
    """Tear down the model-parallel groups and the process group (tests re-initialise)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
