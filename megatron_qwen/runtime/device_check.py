"""GPU or CPU for this process: the one rule every entry point follows.

A process runs on its GPU when torch sees one. Without one it runs on CPU (gloo, FP32, the
``cpu_compat`` redirect) only where nothing expected a GPU: a node Slurm gave GPUs, a
non-empty ``CUDA_VISIBLE_DEVICES``, ``--bf16`` / ``--fp16``, ``DS_ACCELERATOR=cuda`` or
``MEGATRON_QWEN_DEVICE=gpu`` all expect one, and then finding none (an empty device list, a driver
fault, a CPU-only torch) is an error naming what expected it: otherwise that rank would train on
CPU, drop BF16 without a word, and a multi-node job would hang at its first collective.
``MEGATRON_QWEN_DEVICE=cpu`` opts in to CPU explicitly (BF16 / FP16 then run in FP32).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch

from megatron_qwen.config import ConfigError

DEVICE_ENV = "MEGATRON_QWEN_DEVICE"  # cpu | gpu | auto (unset)
_CPU, _GPU = ("cpu",), ("gpu", "cuda")
# what Slurm sets when it gives a job, a step or a node GPUs (--gpus, --gpus-per-node, --gres=gpu):
# GPU indices (any value names a GPU, "0" included) and GPU counts ("0" means none)
SLURM_GPU_ID_VARS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
SLURM_GPU_COUNT_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")
SLURM_GPU_VARS = SLURM_GPU_ID_VARS + SLURM_GPU_COUNT_VARS
_NO_DEVICES = ("", "-1", "none", "NoDevFiles")  # CUDA_VISIBLE_DEVICES values that hide every GPU


def _gives_gpus(name: str, value: Optional[str]) -> bool:
    if value is None or value.strip() in ("", "(null)"):
        return False
    if name in SLURM_GPU_COUNT_VARS:  # "8", "a100:8", "0"
        return value.strip().rsplit(":", 1)[-1] != "0"
    return True


def gpu_expectation(bf16: bool = False, fp16: bool = False,
                    env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """What says this process should have a GPU (e.g. ``'SLURM_GPUS_ON_NODE=8'``), or None."""
    env = os.environ if env is None else env
    choice = env.get(DEVICE_ENV, "").strip().lower()
    if choice in _GPU:
        return f"{DEVICE_ENV}={env[DEVICE_ENV]}"
    for name in SLURM_GPU_VARS:
        if _gives_gpus(name, env.get(name)):
            return f"{name}={env[name]} (Slurm gave this job GPUs)"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in _NO_DEVICES:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    if env.get("DS_ACCELERATOR", "").strip().lower() == "cuda":
        return "DS_ACCELERATOR=cuda"
    if bf16 or fp16:
        return "--bf16" if bf16 else "--fp16"
    return None


def use_gpu(bf16: bool = False, fp16: bool = False, env: Optional[Mapping[str, str]] = None) -> bool:
    """True when this process computes on its GPU, False for CPU. Raises ConfigError (one line)
    when a GPU is expected and torch finds none, or when CPU is asked for while one is visible."""
    env = os.environ if env is None else env
    choice = env.get(DEVICE_ENV, "").strip().lower()
    if choice not in _CPU + _GPU + ("", "auto"):
        raise ConfigError(f"{DEVICE_ENV}={env[DEVICE_ENV]}: expected cpu, gpu or auto")
    have_gpu = torch.cuda.is_available()
    if choice in _CPU:
        if have_gpu:
            raise ConfigError(f"{DEVICE_ENV}=cpu but torch sees {torch.cuda.device_count()} GPU(s): "
                              "hide them with CUDA_VISIBLE_DEVICES= to run on CPU")
        return False
    if have_gpu:
        return True
    why = gpu_expectation(bf16, fp16, env)
    if why:
        raise ConfigError(f"{why} expects a GPU but torch finds none ({_why_no_gpu()}); fix the "
                          f"node or the torch install, or set {DEVICE_ENV}=cpu to run on CPU")
    return False


def _why_no_gpu() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable device"
