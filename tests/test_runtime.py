"""The runtime layer: cpu_compat's redirect of megatron-core's CUDA calls, the megatron-core fixes
(runtime.mcore_fixes, on every device), and init_distributed."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from megatron_qwen.runtime import cpu_compat
from tests.dist import REPO


def test_install_is_a_no_op_when_cuda_is_available():
    """In a fresh process that believes it has a GPU, install() patches nothing."""
    script = textwrap.dedent("""
        import sys
        import torch
        torch.cuda.is_available = lambda: True
        before = {n: getattr(torch, n) for n in ("empty", "zeros", "tensor", "arange")}
        cuda_before = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state,
                       torch.cuda.Stream, torch.cuda.Event)
        tensor_before = (torch.Tensor.cuda, torch.Tensor.type)
        from megatron_qwen.runtime import cpu_compat
        assert cpu_compat.install() is False
        assert cpu_compat.install() is False
        assert not cpu_compat.is_installed()
        assert all(getattr(torch, n) is f for n, f in before.items())
        assert (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state,
                torch.cuda.Stream, torch.cuda.Event) == cuda_before
        assert (torch.Tensor.cuda, torch.Tensor.type) == tensor_before
        assert not any(m.startswith("megatron.") for m in sys.modules)  # megatron-core untouched
        print("UNTOUCHED")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "UNTOUCHED" in proc.stdout, proc.stderr[-3000:]


def test_install_is_idempotent_and_redirects_to_cpu():
    assert cpu_compat.install() is True
    wrapped = (torch.zeros, torch.Tensor.type, torch.cuda.current_device)
    assert cpu_compat.install() is True  # second call: same objects, nothing wrapped twice
    assert (torch.zeros, torch.Tensor.type, torch.cuda.current_device) == wrapped
    assert not hasattr(torch.zeros.__wrapped_cpu_compat__, "__wrapped_cpu_compat__")
    # the calls megatron-core makes
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.type() == "torch.cuda.FloatTensor" and x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert x.long().type() == "torch.LongTensor"  # only the float names megatron compares
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
    # the meta device context still sees the (wrapped) factories
    with torch.device("meta"):
        assert torch.empty(4).device.type == "meta"


def test_model_parallel_rng_tracker_on_cpu():
    """megatron-core's tracker forks real, separate streams of the CPU generator."""
    from megatron.core import tensor_parallel

    cpu_compat.install()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("a", 11)
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = torch.rand(3)
    outside = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), outside)  # the fork left the default stream where it was
    with tracker.fork("a"):
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the forked stream advanced
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), first)  # and it is the stream seeded with 11
    tracker.reset()


def test_init_distributed_single_process_and_destroy():
    from megatron.core import parallel_state as ps

    from megatron_qwen.config import ParallelConfig
    from megatron_qwen.runtime import destroy, init_distributed

    was_initialised = torch.distributed.is_initialized()
    init_distributed(ParallelConfig(), seed=3)
    assert torch.distributed.get_backend() == "gloo"
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_data_parallel_world_size() == 1
    if not was_initialised:
        destroy()
        assert not torch.distributed.is_initialized() and not ps.model_parallel_is_initialized()


def test_megatron_core_fixes_work_without_the_cpu_redirect(tmp_path):
    """Stock megatron-core 0.16.1-0.19.x (only cpu_compat installed) cannot resume its distributed
    optimizer on torch AdamW; runtime.mcore_fixes alone makes a save/load round trip exact."""
    proc = subprocess.run([sys.executable, str(REPO / "tests/scripts/mcore_fixes_check.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stock_fresh"].startswith("AssertionError")  # state_dict() over an empty AdamW
    assert result["stock_stepped"] == "KeyError: 'step'"  # _set_main_param_and_optimizer_states
    assert result["applied"] and result["applied_again"]
    assert result["loaded_steps"] == [2.0] and result["own_step_tensors"] and result["moments_equal"]
    assert result["steps_after"] == [4.0]  # one increment per step, not one per parameter
    assert result["params_equal"]  # the resumed optimizer steps exactly like the saved one
    # load_parameter_state_from_dp_reshardable copies into the fp32 leaf parameters with autograd on
    assert result["stock_dp_reshardable"].startswith("RuntimeError: a view of a leaf Variable that requires grad")
    assert result["dp_loaded_steps"] == [2.0] and result["dp_params_equal"]


def test_init_distributed_applies_megatron_core_fixes_on_a_gpu_node():
    """Where torch reports a GPU the CPU redirect stays off, and the megatron-core fixes are
    applied all the same (before the process group: here NCCL setup then fails on this CPU)."""
    script = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        from megatron_qwen.config import ParallelConfig
        from megatron_qwen.runtime import cpu_compat, init_distributed, mcore_fixes
        try:
            init_distributed(ParallelConfig())
        except Exception:
            pass  # no real GPU behind the claim
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        assert mcore_fixes.is_applied() and not cpu_compat.is_installed()
        assert all(getattr(getattr(DistributedOptimizer, name), "__megatron_qwen_fix__", False)
                   for name in mcore_fixes._FIXES)
        print("FIXED")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "FIXED" in proc.stdout, proc.stderr[-3000:]


def test_fixes_are_only_for_the_megatron_core_versions_read():
    from packaging.version import Version

    from megatron_qwen.runtime import mcore_fixes

    assert mcore_fixes.is_affected(Version("0.16.1")) and mcore_fixes.is_affected(Version("0.19.2"))
    assert not mcore_fixes.is_affected(Version("0.20.0")) and not mcore_fixes.is_affected(Version("0.15.3"))
