"""Device and process-group setup: ``device_check`` decides GPU or CPU, ``mcore_fixes`` patches
megatron-core's own bugs on every device, ``cpu_compat`` lets megatron-core run on CPU with gloo."""

from megatron_qwen.runtime.distributed import destroy, device, init_distributed, seed_everything, world_of_one

__all__ = ["init_distributed", "destroy", "device", "seed_everything", "world_of_one"]
