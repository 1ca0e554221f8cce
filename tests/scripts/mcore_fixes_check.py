"""Worker for tests/test_runtime.py: megatron-core's distributed optimizer, stock and with
runtime.mcore_fixes, in a fresh process with only the CPU redirect (cpu_compat) otherwise.

argv: TMP_DIR. Prints one JSON line: what stock megatron-core raised for a load into a fresh
optimizer and into a stepped one (fully_reshardable, and dp_reshardable into the stepped one),
and, with the fixes, the step counts and whether a resumed
optimizer steps exactly like the one it was saved from.
"""

import json
import os
import sys

import torch


def world():
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    store = torch.distributed.FileStore(os.path.join(sys.argv[1], "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(3)


def build(model_cfg):
    """A tiny GPTModel in megatron-core DDP with the distributed optimizer (torch AdamW inside)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_qwen.config import ParallelConfig
    from megatron_qwen.model import build_model

    torch.manual_seed(0)
    (chunk,) = build_model(model_cfg, ParallelConfig(use_distributed_optimizer=True))
    ddp = DistributedDataParallel(chunk.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), chunk)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1,
                                                 use_distributed_optimizer=True), [ddp])
    return chunk, ddp, opt


def step(ddp, opt, seed):
    tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(seed))
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = ddp(tokens[:, :-1], torch.arange(16).expand(2, 16), None, labels=tokens[:, 1:]).mean()
    loss.backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok


def sharded(chunk, opt, loading, form="fully_reshardable"):
    from megatron_qwen.training.checkpoint import sharded_metadata

    state = {"model": chunk.sharded_state_dict()}
    state["optimizer"] = opt.sharded_state_dict(state, is_loading=loading, metadata=sharded_metadata(form))
    return state


def load_into(chunk, opt, path, form="fully_reshardable"):
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(sharded(chunk, opt, True, form), path)
    chunk.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])


def error_of(fn):
    try:
        fn()
    except Exception as exc:  # what stock megatron-core raises
        return f"{type(exc).__name__}: {exc}"
    return None


def adam_states(opt):
    inner = opt.chained_optimizers[0].optimizer
    return [inner.state[p] for g in inner.param_groups for p in g["params"]]


def main():
    from megatron_qwen.runtime import cpu_compat, mcore_fixes

    assert cpu_compat.install() and not mcore_fixes.is_applied()
    from megatron.core import dist_checkpointing

    from megatron_qwen.config import load_model_config
    from megatron_qwen.training.checkpoint import DP_RESHARDABLE, FULLY_RESHARDABLE, sharded_metadata

    world()
    model_cfg = load_model_config("tiny_vocab", num_layers=2)
    chunk, ddp, opt = build(model_cfg)
    path = os.path.join(sys.argv[1], "ckpt")
    os.makedirs(path)
    result = {"stock_fresh": error_of(lambda: sharded(chunk, opt, True))}
    for seed in (1, 2):
        step(ddp, opt, seed)
    dist_checkpointing.save(sharded(chunk, opt, False), path, content_metadata=sharded_metadata(FULLY_RESHARDABLE))
    dp_path = os.path.join(sys.argv[1], "ckpt_dp")
    os.makedirs(dp_path)
    dist_checkpointing.save(sharded(chunk, opt, False, DP_RESHARDABLE), dp_path,
                            content_metadata=sharded_metadata(DP_RESHARDABLE))
    stepped = build(model_cfg)
    step(stepped[1], stepped[2], 9)  # a non-empty state: the fresh-state assert is not reached
    result["stock_stepped"] = error_of(lambda: load_into(stepped[0], stepped[2], path))
    result["stock_dp_reshardable"] = error_of(lambda: load_into(stepped[0], stepped[2], dp_path, DP_RESHARDABLE))

    result["applied"] = mcore_fixes.apply()
    result["applied_again"] = mcore_fixes.apply()
    chunk2, ddp2, opt2 = build(model_cfg)  # fresh: resuming a job
    load_into(chunk2, opt2, path)
    result["loaded_steps"] = sorted({float(s["step"]) for s in adam_states(opt2)})
    result["own_step_tensors"] = len({id(s["step"]) for s in adam_states(opt2)}) == len(adam_states(opt2))
    result["moments_equal"] = all(torch.equal(a[k], b[k]) for a, b in zip(adam_states(opt), adam_states(opt2))
                                  for k in ("exp_avg", "exp_avg_sq"))
    chunk3, ddp3, opt3 = build(model_cfg)  # the same resume from the dp_reshardable form
    load_into(chunk3, opt3, dp_path, DP_RESHARDABLE)
    result["dp_loaded_steps"] = sorted({float(s["step"]) for s in adam_states(opt3)})
    for seed in (3, 4):
        step(ddp, opt, seed)
        step(ddp2, opt2, seed)
        step(ddp3, opt3, seed)
    result["dp_params_equal"] = all(torch.equal(a, b) for a, b in zip(chunk.parameters(), chunk3.parameters()))
    result["steps_after"] = sorted({float(s["step"]) for s in adam_states(opt2)})
    result["params_equal"] = all(torch.equal(a, b) for a, b in zip(chunk.parameters(), chunk2.parameters()))
    print(json.dumps(result), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing may spawn helpers that re-import this file
    main()
