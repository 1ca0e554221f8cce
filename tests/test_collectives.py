"""Collectives on the right device, and the training step's grad norm taken once.

On a GPU node the process groups are NCCL, which refuses CPU tensors; a CPU run with gloo
accepts them. tests/collective_guard.py makes the CPU run see the difference (a tensor made
without a device, or computed from such tensors alone, is what would be on the CPU there), and
tests/scripts/collectives_check.py drives the real trainers under it on 2 gloo processes.
"""

import json
from pathlib import Path

import pytest
import torch

from tests.collective_guard import CollectiveGuard, OffDeviceCollective
from tests.dist import run_torchrun

SCRIPT = Path(__file__).parent / "scripts" / "collectives_check.py"
PHASES = ["reward_model", "ppo", "megatron_loop", "perplexity", "parameter_count"]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("collectives")
    run_torchrun(SCRIPT, work, nproc=2)
    return json.loads((work / "results.json").read_text())


def test_the_guard_flags_what_nccl_refuses():
    import torch.distributed as dist

    from megatron_qwen.runtime import world_of_one

    device = torch.device("cpu")  # stands for the GPU: every tensor placed on it explicitly
    with world_of_one(), CollectiveGuard() as guard:
        on_device = torch.ones(2, device=device)
        dist.all_reduce(on_device)
        dist.all_reduce(on_device.new_tensor([1.0, 2.0]))  # new_tensor / *_like inherit the device
        dist.all_reduce(torch.zeros_like(on_device) + 1)
        dist.all_reduce(torch.tensor([1.0]).to(device))
        host = torch.tensor([1.0, 2.0])
        for made_on_host in (host, host.clone() * 2, torch.zeros_like(host), torch.arange(3).double()):
            with pytest.raises(OffDeviceCollective, match="test_collectives.py"):
                dist.all_reduce(made_on_host)
        with pytest.raises(OffDeviceCollective, match="stack of CPU and device"):
            torch.stack([on_device.sum(), torch.tensor(1.0)])
        assert guard.calls["all_reduce"] == 8


@pytest.mark.parametrize("phase", PHASES)
def test_every_collective_gets_a_device_tensor(results, phase):
    assert results[phase] == "ok", results[phase]


def test_the_step_takes_the_grad_norm_once(results):
    """megatron-core's step() computes the norm (for clipping) and returns it; the loop used to
    call prepare_grads + get_grad_norm before it, one more norm all-reduce (2 collectives at
    DP=2 with the distributed optimizer) per step. Same losses and norms, bit for bit."""
    r = results["step_all_reduces"]
    assert r["one_grad_norm"] >= 1
    separate, ours = r["separate_calls"], r["train_step"]
    assert ours["all_reduces"] == [n - r["one_grad_norm"] for n in separate["all_reduces"]]
    assert ours["values"] == separate["values"]
