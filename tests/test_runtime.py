"""The CPU runtime: cpu_compat's redirect of megatron-core's CUDA calls, and init_distributed."""

import subprocess
import sys
import textwrap

import torch

from megatron_qwen.runtime import cpu_compat


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
