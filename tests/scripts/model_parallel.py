"""Worker for tests/test_model_parallel.py, run under torchrun with 2 gloo processes.

For every layout named on the command line: build the tiny Qwen model on megatron-core, load the
weights of a random transformers Qwen2ForCausalLM, and check against that reference (computed in
this process, single-device, plain PyTorch):
  1. logits (eval, through the pipeline schedule, gathered over TP)      max abs diff <= 1e-4
  2. one training step with megatron-core DDP + get_megatron_optimizer (Adam, grad clip 1.0),
     two micro-batches: the loss and the gradient norm (rel 1e-5) and every updated weight
     (abs 1e-5 = 1% of the ~lr = 1e-3 that Adam's first step moves
     each weight; Adam normalises each gradient, so rounding in near-zero gradients shows up) against torch AdamW on the HF model.
Because every layout is compared with the same single-device reference, TP=2, PP=2 and DP=2 are
also checked against each other and against TP=1. Prints "OK <layout>" per layout.
"""

from __future__ import annotations

import copy
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(__file__))

from model_common import full_mcore_state, hf_reference, load_into_chunks, local_shards, unwrap  # noqa: E402

from megatron_qwen.config import ParallelConfig, load_model_config  # noqa: E402
from megatron_qwen.model import build_model, count_parameters  # noqa: E402
from megatron_qwen.runtime import destroy, init_distributed  # noqa: E402

LAYOUTS = {
    "dp2": dict(overlap_grad_reduce=True),  # TP=1 on two processes: DP=2, bucketed overlap
    "tp2": dict(tensor_model_parallel_size=2),
    "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True, overlap_grad_reduce=True),
    "pp2": dict(pipeline_model_parallel_size=2),  # 1F1B
    "pp2_vpp2": dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    "dp2_distopt": dict(use_distributed_optimizer=True),
    "dp2_distopt_overlap": dict(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                overlap_param_gather=True),
}

CHECKPOINTED = ("tp2", "pp2_vpp2", "dp2_distopt")  # also saved/reloaded with torch_dist
LR, BETAS, EPS, CLIP = 1e-3, (0.9, 0.95), 1e-8, 1.0
GLOBAL_BATCH, SEQ, MICROBATCHES = 4, 16, 2


def batch(vocab: int):
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def reference_step(hf, tokens, labels):
    """Single-device truth: logits, loss, grad norm (before clipping), updated weights."""
    hf = copy.deepcopy(hf).train()
    logits = hf(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), CLIP)
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    opt.step()
    return logits.detach(), loss.item(), grad_norm.item(), hf


def forward_step(data_iterator, model, labels_on=True):
    tokens, labels = next(data_iterator)
    position_ids = torch.arange(tokens.size(1)).expand_as(tokens)
    if labels_on:
        output = model(tokens, position_ids, None, labels=labels)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place
    else:
        output = model(tokens, position_ids, None)

        def loss_func(logits):
            return logits.sum() * 0, {"logits": logits.detach()}
    return output, loss_func


def gather_tp_vocab(logits):
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def microbatches(tokens, labels):
    """This DP rank's share of the global batch, cut into MICROBATCHES micro-batches."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = GLOBAL_BATCH // dp
    tokens, labels = tokens[rank * per:(rank + 1) * per], labels[rank * per:(rank + 1) * per]
    mbs = per // MICROBATCHES
    return [(tokens[i * mbs:(i + 1) * mbs], labels[i * mbs:(i + 1) * mbs]) for i in range(MICROBATCHES)], mbs


def setup(name: str, model_cfg, hf):
    """init + build + load the reference weights + DDP + megatron optimizer for one layout."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    parallel_cfg = ParallelConfig(**LAYOUTS[name])
    init_distributed(parallel_cfg, seed=1)
    chunks = build_model(model_cfg, parallel_cfg)
    load_into_chunks(chunks, full_mcore_state(hf, model_cfg, parallel_cfg.tensor_model_parallel_size),
                     model_cfg, parallel_cfg)
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        bucket_size=4096 if parallel_cfg.overlap_grad_reduce else None,  # several buckets
    )
    model = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
             for i, chunk in enumerate(chunks)]
    one_or_list = (lambda fns: fns if len(fns) > 1 else fns[0])  # noqa: E731
    config.no_sync_func = one_or_list([m.no_sync for m in model])
    if parallel_cfg.overlap_grad_reduce:
        config.grad_sync_func = one_or_list([m.start_grad_sync for m in model])
    if parallel_cfg.overlap_param_gather:
        config.param_sync_func = one_or_list([m.start_param_sync for m in model])
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, adam_beta1=BETAS[0],
                        adam_beta2=BETAS[1], adam_eps=EPS, clip_grad=CLIP,
                        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer),
        model,
    )
    return parallel_cfg, model, optimizer


def train_step(model, optimizer, mbs_list, mbs):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for m in model:
        m.train()
        m.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(mbs_list) for _ in model],
        model=model, num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=mbs,
        forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step skipped"
    for m in model:  # with overlap_param_gather the updated params arrive at the next forward
        if m.ddp_config.overlap_param_gather:
            m.start_param_sync(force_sync=True)
    return losses, grad_norm


def max_diff_to(model, full_state, model_cfg, parallel_cfg) -> float:
    """Largest |param - expected| over this rank's shards of a full megatron-core state dict."""
    worst = 0.0
    for vp_stage, m in enumerate(model):
        exp = local_shards(full_state, model_cfg, parallel_cfg, vp_stage)
        for pname, p in unwrap(m).named_parameters():
            worst = max(worst, (p.detach() - exp[pname]).abs().max().item())
    return worst


def run_layout(name: str, model_cfg, hf, reference, ckpt_dir=None) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    parallel_cfg, model, optimizer = setup(name, model_cfg, hf)
    tp = parallel_cfg.tensor_model_parallel_size
    tokens, labels = batch(model_cfg.vocab_size)
    ref_logits, ref_loss, ref_norm, ref_model = reference
    mbs_list, mbs = microbatches(tokens, labels)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)

    # 1. logits, forward only
    for m in model:
        m.eval()
    out = get_forward_backward_func()(
        forward_step_func=partial(forward_step, labels_on=False),
        data_iterator=[iter(mbs_list) for _ in model], model=model,
        num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=mbs, forward_only=True)
    if last:
        logits = torch.cat([gather_tp_vocab(o["logits"]) for o in out])
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per = GLOBAL_BATCH // dp
        diff = (logits - ref_logits[rank * per:(rank + 1) * per]).abs().max().item()
        assert diff <= 1e-4, f"{name}: logits differ from Qwen2ForCausalLM by {diff}"

    # 2. one optimizer step
    losses, grad_norm = train_step(model, optimizer, mbs_list, mbs)
    assert abs(grad_norm - ref_norm) <= 1e-5 * ref_norm, f"{name}: grad norm {grad_norm} vs {ref_norm}"
    if last:
        loss = torch.stack([x["loss"] for x in losses]).mean()
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        loss = loss.item() / ps.get_data_parallel_world_size()
        assert abs(loss - ref_loss) <= 1e-5 * ref_loss, f"{name}: loss {loss} vs reference {ref_loss}"
    worst = max_diff_to(model, full_mcore_state(ref_model, model_cfg, tp), model_cfg, parallel_cfg)
    assert worst <= 1e-5, f"{name}: updated weights differ from the reference by {worst}"
    print(f"OK {name} loss={ref_loss:.6f} grad_norm={grad_norm:.6f} max_weight_diff={worst:.2e}", flush=True)
    if ckpt_dir:
        checkpoint_roundtrip(name, model_cfg, hf, model, optimizer, mbs_list, mbs, ckpt_dir)


def checkpoint_roundtrip(name, model_cfg, hf, model, optimizer, mbs_list, mbs, ckpt_dir) -> None:
    """torch_dist save of model + optimizer after step 1; a fresh model/optimizer loads it and
    takes step 2, which must equal step 2 of the original (so Adam's moments came back)."""
    from megatron.core import dist_checkpointing

    path = os.path.join(ckpt_dir, name)
    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    state = {f"model{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(model)}
    state["optimizer"] = optimizer.sharded_state_dict(dict(state), metadata=_OPT_META)
    dist_checkpointing.save(state, path)
    train_step(model, optimizer, mbs_list, mbs)
    want = {n: p.detach().clone() for i, m in enumerate(model) for n, p in
            ((f"{i}.{n}", p) for n, p in unwrap(m).named_parameters())}

    parallel_cfg, fresh, fresh_opt = setup(name, model_cfg, hf)  # reference weights, no step yet
    state = {f"model{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(fresh)}
    state["optimizer"] = fresh_opt.sharded_state_dict(dict(state), is_loading=True, metadata=_OPT_META)
    loaded = dist_checkpointing.load(state, path)
    for i, m in enumerate(fresh):
        unwrap(m).load_state_dict(loaded[f"model{i}"])
    with torch.no_grad():  # fp32 + distributed optimizer: main params are views of the params
        fresh_opt.load_state_dict(loaded["optimizer"])
    train_step(fresh, fresh_opt, mbs_list, mbs)
    worst = max((p.detach() - want[f"{i}.{n}"]).abs().max().item()
                for i, m in enumerate(fresh) for n, p in unwrap(m).named_parameters())
    assert worst <= 1e-7, f"{name}: step 2 after a torch_dist reload differs by {worst}"
    print(f"OK {name} checkpoint roundtrip (model + optimizer) step2 diff={worst:.1e}", flush=True)


_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


def reshard_check(saved: str, target: str, model_cfg, hf, ckpt_dir) -> None:
    """The model weights saved by one layout, loaded by another (torch_dist resharding)."""
    from megatron.core import dist_checkpointing

    parallel_cfg, model, _ = setup(target, model_cfg, hf)
    state = {f"model{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(model)}
    loaded = dist_checkpointing.load(state, os.path.join(ckpt_dir, saved))
    for i, m in enumerate(model):
        unwrap(m).load_state_dict(loaded[f"model{i}"])
    return parallel_cfg, model


def main() -> None:
    layouts = sys.argv[1:] or list(LAYOUTS)
    model_cfg = load_model_config("tiny_vocab")
    hf = hf_reference(model_cfg, seed=0)
    tokens, labels = batch(model_cfg.vocab_size)
    reference = reference_step(hf, tokens, labels)
    ckpt_dir = os.environ.get("MODEL_CKPT_DIR")
    for name in layouts:
        if name.startswith("count:"):  # count_parameters inside a distributed run of that layout
            init_distributed(ParallelConfig(**LAYOUTS[name.split(":")[1]]), seed=1)
            got, want = count_parameters(model_cfg), sum(p.numel() for p in hf.parameters())
            assert got == want, f"{name}: count_parameters {got} vs Qwen2ForCausalLM {want}"
            print(f"OK {name} {got}", flush=True)
        elif name.startswith("reshard:"):  # reshard:SAVED_LAYOUT:TARGET_LAYOUT
            _, saved, target = name.split(":")
            parallel_cfg, model = reshard_check(saved, target, model_cfg, hf, ckpt_dir)
            # the saved checkpoint holds the weights after step 1 (== the reference's step)
            worst = max_diff_to(model, full_mcore_state(reference[3], model_cfg,
                                parallel_cfg.tensor_model_parallel_size), model_cfg, parallel_cfg)
            assert worst <= 1e-5, f"{name}: resharded weights differ by {worst}"
            print(f"OK {name} diff={worst:.2e}", flush=True)
        else:
            run_layout(name, model_cfg, hf, reference, ckpt_dir if name in CHECKPOINTED else None)
    destroy()


if __name__ == "__main__":
    main()
