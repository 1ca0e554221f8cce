"""The memory plan of pretraining and SFT on megatron-core (``PretrainConfig``).

Per GPU of the worst pipeline stage: parameters (TP-split, this stage's layers, the embedding
on the first stage and the output layer on the last), megatron-core DDP's fp32 gradient buffer
(``grad_reduce_in_fp32``), Adam's state (fp32 master copy under bf16, two moments; sharded over
data-parallel ranks by the distributed optimizer), activations of the micro-batches 1F1B keeps
in flight (with the recipe's recompute and sequence parallelism), the logits at the loss, and the
sequence-parallel all-gather buffer megatron-core keeps.
"""

from __future__ import annotations

from megatron_qwen.memory_plan import activations as act
from megatron_qwen.memory_plan.plan import Component, MemoryPlan
from megatron_qwen.memory_plan.shape import from_model_config

FIX_MICRO = "lower train.micro_batch_size (--micro-batch-size), or set --recompute-granularity selective/full"
FIX_SHARD = "raise tensor_model_parallel_size / pipeline_model_parallel_size (--tensor-model-parallel-size)"


def _stage(cfg, shape, e, dp, first: bool, last: bool) -> list:
    """The components of one pipeline stage."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    layers = m.num_layers // pp
    params = layers * shape.layer_params(tp) + (shape.embedding_params(tp) if first else 0) \
        + ((shape.embedding_params(tp) + shape.hidden) if last else 0)
    opt_per_param = 12 if e == 2 else 8  # fp32 master + 2 moments; fp32 params are their own master
    shard = dp if p.use_distributed_optimizer else 1
    micro_tokens = t.micro_batch_size * m.seq_length
    num_micro = cfg.num_microbatches(dp)
    # 1F1B: the first stage holds pp micro-batches in flight, the last one; interleaving adds
    # (pp - 1) / (pp x vpp) of that (Narayanan et al. 2021)
    in_flight = 1 if not first or pp == 1 else min(num_micro, pp)
    if first and vpp > 1:
        in_flight = min(num_micro, pp) * (1 + (pp - 1) / (pp * vpp))
    unfused = m.seq_length if m.attention_backend == "unfused" else 0
    per_layer = act.layer_bytes_per_token(shape, e, tp, p.sequence_parallel, m.recompute_granularity,
                                          m.hidden_dropout > 0, unfused) * micro_tokens
    layer_input = e * micro_tokens * shape.hidden / (tp if p.sequence_parallel else 1)
    if m.recompute_granularity == "full":
        n = m.recompute_num_layers
        stage_act = (layers / n) * layer_input * in_flight + n * per_layer
        how_act = (f"{in_flight:g} micro-batch(es) x {layers // n} checkpointed chunk inputs + "
                   f"one chunk of {n} layer(s) recomputed")
    else:
        stage_act = layers * per_layer * in_flight
        how_act = (f"{layers} layers x {in_flight:g} micro-batch(es) in flight x {micro_tokens} tokens"
                   + (", selective recompute" if m.recompute_granularity == "selective" else ""))
    comps = [
        Component("parameters", params * e, f"{params / 1e9:.3f}B x {e} B", FIX_SHARD),
        Component("gradients", params * 4, "megatron-core DDP fp32 grad buffer (4 B/param)", FIX_SHARD),
        Component("optimizer state", params * opt_per_param / shard,
                  f"Adam {opt_per_param} B/param" + (f" / {dp} DP ranks (distributed optimizer)" if shard > 1 else ""),
                  "set parallel.use_distributed_optimizer (--use-distributed-optimizer) or raise TP/PP"),
        Component("activations", stage_act, how_act, FIX_MICRO, phase="training"),
    ]
    # backward computes each weight's gradient before adding it to the fp32 buffer (no fused
    # accumulation on this stack): the largest (the output layer's) lands while the logits live;
    # a layer's activation gradients are at most its saved activations
    wgrad = (shape.embedding_params(tp) if (first or last) else shape.layer_params(tp) // 3) * e
    comps.append(Component("backward working set", max(wgrad, per_layer),
                           "largest of: the biggest weight gradient before accumulation, one "
                           "layer's activation gradients", FIX_MICRO, phase="training"))
    if last:
        comps.append(Component("logits", act.logits_bytes_per_token(shape.vocab / tp, e, in_place_softmax=True) * micro_tokens,
                               f"{micro_tokens} tokens x {shape.vocab // tp} vocab rows at the loss",
                               FIX_MICRO + "; or raise TP (splits the vocabulary)", phase="training"))
    largest = shape.embedding_params(tp) if (first or last) else shape.layer_params(tp) // 3
    comps.append(Component("optimizer step buffers", 2 * 4 * largest / shard,
                           "torch AdamW's two temporaries of the largest parameter (shard); "
                           "none with a fused Adam", FIX_SHARD, phase="optimizer step"))
    if p.sequence_parallel:
        comps.append(Component("communication buffers", e * micro_tokens * shape.hidden,
                               "megatron-core's global buffer for sequence-parallel all-gathers",
                               FIX_MICRO, phase="training"))
    return comps


def plan_pretrain(cfg, world_size: int, gpu_bytes=None, on_gpu: bool = True) -> MemoryPlan:
    """The plan of the worst pipeline stage of ``cfg`` on ``world_size`` GPUs (``on_gpu=False``:
    the fp32 run a CPU machine makes of the same recipe)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    dp = cfg.check_world(world_size)
    shape = from_model_config(m, tp)
    e = cfg.compute_dtype(on_gpu).itemsize
    stages = [(True, True)] if pp == 1 else [(True, False), (False, True)]
    plans = [MemoryPlan("", _stage(cfg, shape, e, dp, first, last), gpu_bytes) for first, last in stages]
    worst = max(plans, key=lambda pl: pl.peak)
    layout = f"TP={tp} PP={pp}" + (f" VPP={vpp}" if vpp > 1 else "") + f" DP={dp}"
    worst.title = (f"{t.task} {m.preset or 'model'}: {layout}, micro-batch {t.micro_batch_size} x "
                   f"{m.seq_length}, {'bf16' if e == 2 else 'fp32'}"
                   + (", distributed optimizer" if p.use_distributed_optimizer else "")
                   + (", SP" if p.sequence_parallel else "")
                   + (f", recompute {m.recompute_granularity}" if m.recompute_granularity else "")
                   + ("" if pp == 1 else f" ({'first' if worst is plans[0] else 'last'} pipeline stage)"))
    return worst
