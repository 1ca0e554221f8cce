"""What differs between the megatron-core versions this package supports, in one place.

setup.py allows megatron-core ``SUPPORTED`` (0.16.1 and 0.19.x are what the tests run on; see
docs/architecture.md). Every difference the rest of the package must know about is a function
here, keyed on the installed version, so callers never compare versions themselves. The CPU
redirect (``runtime.cpu_compat``) and megatron-core's checkpoint bug fixes (``runtime.mcore_fixes``,
0.16.x only) stay in their own modules and call in here where a version matters.

This module imports neither torch nor megatron-core at import time: ``megatron_qwen/__init__``
calls ``install_import_shims()`` before anything imports megatron-core.
"""

from __future__ import annotations

import functools
import importlib.machinery
import sys
import types

# The range setup.py declares. 0.17+ declares Python>=3.12, so pip on 3.11 resolves 0.16.x.
SUPPORTED = ">=0.16.1,<0.20"


@functools.cache
def version():
    """The installed megatron-core version, a ``packaging.version.Version``, from its metadata
    (megatron-core is not imported). importlib.metadata and packaging are imported here, not at
    module import: they cost 0.2 s and ``import megatron_qwen`` loads this module."""
    from importlib import metadata

    from packaging.version import Version

    return Version(metadata.version("megatron-core"))


def at_least(release: str) -> bool:
    from packaging.version import Version

    return version() >= Version(release)


def is_supported() -> bool:
    from packaging.specifiers import SpecifierSet

    return version() in SpecifierSet(SUPPORTED)


# --- import shims ---------------------------------------------------------------------------

# megatron-core >= 0.19 imports Triton unconditionally in this one module (the MoE paged-stash
# kernels), reached from pipeline_parallel.schedules, so `import megatron.core` fails where Triton
# is not installed (CPU machines; Triton is a GPU kernel compiler). A top-level stand-in `triton`
# would fool torch into thinking Triton exists; the stand-in replaces only this module.
PAGED_STASH_KERNELS = "megatron.core.transformer.moe.ops.paged_stash"


def _kernel_without_triton(name: str):
    def kernel(*args, **kwargs):
        raise RuntimeError(f"{PAGED_STASH_KERNELS}.{name} needs Triton, which is not installed "
                           "(MoE paged stash is a GPU feature: install triton)")

    kernel.__name__ = name
    return kernel


class _PagedStashStandIn:
    """A meta-path finder and loader (importlib's protocol; its ABCs cost 0.1 s to import) that
    serves PAGED_STASH_KERNELS without Triton: the same three names, kernels that raise."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PAGED_STASH_KERNELS:
            return None
        import importlib.util

        if importlib.util.find_spec("triton") is not None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType):
        module.GLOBAL_BLOCK_SIZE = 1024  # the value megatron-core 0.19.2 defines
        module.paged_stash_copy_kernel = _kernel_without_triton("paged_stash_copy_kernel")
        module.paged_stash_pop_kernel = _kernel_without_triton("paged_stash_pop_kernel")
        module.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
        module.__megatron_qwen_stand_in__ = True


def install_import_shims() -> None:
    """Make `import megatron.core` work on every supported version; idempotent, cheap."""
    if not any(isinstance(f, _PagedStashStandIn) for f in sys.meta_path):
        sys.meta_path.insert(0, _PagedStashStandIn())


# --- torch_dist checkpoints -----------------------------------------------------------------

# Where a checkpoint keeps its common (non-tensor) state: 0.16-0.18 write ``common.pt`` beside
# the shards; 0.19 writes it into the torch_dist checkpoint as one ShardedObject, ``common_state``
# (global shape (1,), offset (0,): this is its key in torch's checkpoint). 0.19 still reads
# ``common.pt``; torch itself reads ``common_state`` whatever megatron-core is installed, so
# ``checkpoint.safe_load.load_common`` reads both on every version.
COMMON_FILE = "common.pt"
COMMON_STATE_KEY = "common_state/shard_0_1"
# Keys megatron-core adds to a torch_dist checkpoint beyond the state dict saved: 0.19's
# ``common_state`` (its own loader leaves it out of the metadata it compares); none before 0.19.
FORMAT_KEYS = frozenset({COMMON_STATE_KEY.split("/")[0]})


def save_forks_writers() -> bool:
    """Whether a torch_dist save forks one writer process per bucket (0.16,
    ``filesystem_async.py``); 0.17+ write with threads of the saving process, so the spawn
    Manager of the results queue is the only helper process (``checkpoint.save_processes``)."""
    return not at_least("0.17")


def route_checkpoint_reads(reader_factory, load_common) -> None:
    """Point every read megatron-core makes of a torch_dist checkpoint at ``reader_factory`` (for
    the shards and their metadata) and ``load_common`` (for ``common.pt``).

    0.16 takes a common-load strategy per ``dist_checkpointing.load`` call
    (``load_arguments``); 0.17+ has no such argument and calls ``serialization.load_common``
    directly, and 0.19's ``serialization`` holds its own reference to the reader factory (for
    ``common_state``)."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    if not hasattr(torch_strategy, "_get_filesystem_reader"):  # megatron-core moved on: fail loudly
        raise RuntimeError(f"megatron-core {version()} has no strategies.torch._get_filesystem_reader"
                           "; update megatron_qwen/runtime/mcore_version.py")
    torch_strategy._get_filesystem_reader = reader_factory
    if at_least("0.19"):
        serialization._get_filesystem_reader = reader_factory
    if at_least("0.17"):
        serialization.load_common = load_common


def load_arguments(load_common) -> dict:
    """Extra keyword arguments for ``dist_checkpointing.load`` so it reads ``common.pt`` with
    ``load_common``: a strategy object on 0.16, nothing on 0.17+ (``route_checkpoint_reads``)."""
    if at_least("0.17"):
        return {}
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class _CommonLoad(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return load_common(checkpoint_dir)

    return {"common_strategy": _CommonLoad()}


def async_save_arguments() -> dict:
    """Extra keyword arguments for ``dist_checkpointing.save(async_sharded_save=True)`` so it uses
    megatron-core's own async writer (``strategies.async_utils``): 0.19 defaults to NVIDIA
    resiliency-ext's (``async_strategy="nvrx"``), which is not a dependency; 0.16 has one writer."""
    import inspect

    from megatron.core import dist_checkpointing

    return ({"async_strategy": "mcore"}
            if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters else {})


def batch_on_this_cp_rank(batch: dict) -> dict:
    """This context-parallel rank's two load-balanced chunks of every sequence in ``batch``
    (megatron-core's ``get_batch_on_this_cp_rank``): 0.19 added a required ``is_hybrid_cp``
    argument (False: our CP is plain, one group for all sequences)."""
    import inspect

    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False)
    return get_batch_on_this_cp_rank(batch)
