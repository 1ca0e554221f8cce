"""Device and process-group setup: ``device_check`` decides GPU or CPU, ``mcore_version`` holds what
differs between megatron-core versions, ``mcore_fixes`` patches megatron-core's own bugs on every
device, ``cpu_compat`` lets megatron-core run on CPU with gloo.

The process-group helpers are loaded on first use, so ``megatron_qwen/__init__`` can install
``mcore_version``'s import shims without importing torch."""

__all__ = ["init_distributed", "destroy", "device", "seed_everything", "world_of_one"]


def __getattr__(name: str):
    if name in __all__:
        from megatron_qwen.runtime import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
