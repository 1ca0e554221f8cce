import os

# Tests never reach a hub, and DeepSpeed uses its CPU accelerator.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Before any test imports megatron-core: megatron-core 0.19 without Triton needs the import shims
# megatron_qwen installs (runtime/mcore_version.py).
import megatron_qwen  # noqa: E402,F401
