"""Device and process-group setup; ``cpu_compat`` lets megatron-core run on CPU with gloo."""

from megatron_qwen.runtime.distributed import destroy, device, init_distributed, seed_everything, world_of_one

__all__ = ["init_distributed", "destroy", "device", "seed_everything", "world_of_one"]
