import os

import pytest

# Tests never reach a hub, and DeepSpeed uses its CPU accelerator.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Before any test imports megatron-core: megatron-core 0.19 without Triton needs the import shims
# megatron_qwen installs (runtime/mcore_version.py).
import megatron_qwen  # noqa: E402,F401


# Shared fixtures: one process's megatron world (TP=PP=1, gloo) and the tiny real-vocabulary model
# config (seq_length 64, head dim 16). A module that needs another world defines its own.
@pytest.fixture(scope="module")
def world():
    from megatron_qwen.config import ParallelConfig
    from megatron_qwen.runtime import destroy, init_distributed

    init_distributed(ParallelConfig(), seed=1)
    yield
    destroy()


@pytest.fixture(scope="module")
def tiny():
    from megatron_qwen.config import load_model_config

    return load_model_config("tiny_vocab")
