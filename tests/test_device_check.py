"""GPU expected but absent is a one-line error at every entry point; CPU stays automatic on a
machine where nothing expects a GPU, and MEGATRON_QWEN_DEVICE=cpu opts in (runtime.device_check).

The entry points run as subprocesses with the environment a GPU job would give them (Slurm's GPU
variables, CUDA_VISIBLE_DEVICES, DS_ACCELERATOR=cuda, --bf16) on this CPU-only torch: each must
stop before building a model, with one line naming what expected the GPU.
"""

import os
import subprocess
import sys

import pytest
import torch

from megatron_qwen.config import ConfigError
from megatron_qwen.runtime import device_check
from tests.dist import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")

# the variables of a GPU job, as Slurm sets them (the GPU indices of the job, a step, a node)
GPU_JOB = {"SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_GPUS": "0", "SLURM_STEP_GPUS": "0,1",
           "SLURM_GPUS": "2", "SLURM_GPUS_PER_NODE": "2", "SLURM_GPUS_PER_TASK": "1",
           "CUDA_VISIBLE_DEVICES": "0,1", "DS_ACCELERATOR": "cuda", device_check.DEVICE_ENV: "gpu"}


def _clean_env(**extra) -> dict:
    """This environment without anything that expects a GPU, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in device_check.SLURM_GPU_VARS + ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR",
                                                       device_check.DEVICE_ENV, "MASTER_ADDR", "WORLD_SIZE")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.parametrize("name", list(GPU_JOB))
def test_each_gpu_signal_without_a_gpu_is_an_error_naming_it(name):
    with pytest.raises(ConfigError, match=f"^{name}={GPU_JOB[name]}.* expects a GPU but torch finds none"):
        device_check.use_gpu(env={name: GPU_JOB[name]})


def test_nothing_expecting_a_gpu_runs_on_cpu_and_cpu_is_an_explicit_choice():
    hidden = {"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS_PER_NODE": "a100:0",
              "DS_ACCELERATOR": "cpu"}
    assert device_check.use_gpu(env={}) is False
    assert device_check.use_gpu(env=hidden) is False  # GPUs hidden on purpose, none given by Slurm
    with pytest.raises(ConfigError, match="^--bf16 expects a GPU"):
        device_check.use_gpu(bf16=True, env={})
    opt_in = {**GPU_JOB, device_check.DEVICE_ENV: "cpu"}
    assert device_check.use_gpu(bf16=True, env=opt_in) is False
    with pytest.raises(ConfigError, match=f"^{device_check.DEVICE_ENV}=tpu: expected cpu, gpu or auto"):
        device_check.use_gpu(env={device_check.DEVICE_ENV: "tpu"})


# entry point, its arguments, and the one thing in its environment that expects a GPU
ENTRY_POINTS = {
    "pretrain": (["pretrain_qwen.py", "--config", "examples/pretrain_tiny.yaml"], {"SLURM_GPUS_ON_NODE": "8"}),
    "sft_bf16": (["pretrain_qwen.py", "--config", "examples/sft_tiny.yaml", "--bf16"], {}),
    "reward_model": (["tools/train_reward_model.py", "--config", "examples/rm_tiny_cpu.yaml"],
                     {"SLURM_JOB_GPUS": "0"}),
    "ppo": (["tools/train_ppo.py", "--config", "examples/ppo_tiny_cpu.yaml"], {"DS_ACCELERATOR": "cuda"}),
    "generate": (["tools/generate.py", "--load", "no_such_ckpt", "--prompt", "hi"], {"CUDA_VISIBLE_DEVICES": "0"}),
    "eval_ppl": (["tools/eval_ppl.py", "--load", "no_such_ckpt", "--data", "no_such.jsonl"],
                 {"SLURM_STEP_GPUS": "3"}),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_point_stops_in_one_line_when_its_gpu_is_missing(entry, tmp_path):
    argv, env = ENTRY_POINTS[entry]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=_clean_env(**env))
    what = next(iter(env.items()), ("--bf16", None))
    named = what[0] if what[1] is None else f"{what[0]}={what[1]}"
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "expects a GPU" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: {named}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_explicit_cpu_opt_in_gets_past_the_device_check(tmp_path):
    """MEGATRON_QWEN_DEVICE=cpu in a GPU job's environment with --bf16: the run starts on CPU
    (it gets as far as the data, which is missing here) and says that BF16 runs in FP32."""
    env = _clean_env(**{**GPU_JOB, device_check.DEVICE_ENV: "cpu", "DS_ACCELERATOR": "cpu"})
    proc = subprocess.run([sys.executable, "pretrain_qwen.py", "--config", "examples/pretrain_tiny.yaml",
                           "--bf16", "--data-path", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 2 and "expects a GPU" not in proc.stderr, proc.stderr[-3000:]
    assert f"{device_check.DEVICE_ENV}=cpu: --bf16 runs in FP32 on CPU" in proc.stdout
    assert str(tmp_path / "missing") in proc.stderr.splitlines()[-1]
