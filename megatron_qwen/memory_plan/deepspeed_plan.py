"""The memory plans of the DeepSpeed trainers: the reward model (one engine) and PPO (four).

The models are transformers' Qwen2 (``rlhf/hf_model.py``); activations per token are those of
:mod:`activations`; with gradient checkpointing each layer keeps only its input, and backward
recomputes one layer at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_qwen.memory_plan import activations as act
from megatron_qwen.memory_plan.plan import Component, MemoryPlan
from megatron_qwen.memory_plan.shape import ModelShape, hf_shape
from megatron_qwen.memory_plan.zero import Engine


GATHER_HOW = ("largest module + prefetch bucket; the largest parameter's gradient and its "
              "reduce-scatter copy")


def hf_activation_bytes(shape: ModelShape, e: int, batch: int, seq: int, checkpointing: bool) -> float:
    """Saved activations of one forward of ``batch`` x ``seq`` tokens (without the logits)."""
    tokens = batch * seq
    layer = act.layer_bytes_per_token(shape, e) * tokens
    mask = batch * seq * seq  # the boolean [b, 1, s, s] attention mask SDPA gets with padding
    if checkpointing:
        return shape.layers * e * shape.hidden * tokens + layer + mask
    return shape.layers * layer + act.norm_bytes(shape.hidden, e) * tokens + mask


def _e(bf16: bool, on_gpu: bool) -> int:
    return 2 if bf16 and on_gpu else 4


def plan_reward_model(cfg, world_size: int, gpu_bytes: Optional[float] = None, on_gpu: bool = True,
                      model_preset: Optional[str] = None) -> MemoryPlan:
    """``RewardModelConfig`` on ``world_size`` GPUs: one engine, a micro-batch of 2 x micro
    sequences (chosen and rejected) of at most ``data.seq_length`` tokens."""
    from megatron_qwen.rlhf.deepspeed_config import ds_config_from_group

    ds, opt = cfg.deepspeed, cfg.optim
    shape = hf_shape(cfg.model.model_path, model_preset, "model.model_path")
    e = _e(ds.bf16, on_gpu)
    params = shape.total_params(heads_out=1)
    config = ds_config_from_group(ds, micro_batch_size=opt.micro_batch_size,
                                  global_batch_size=opt.global_batch_size, world_size=world_size,
                                  gradient_clipping=opt.clip_grad)
    engine = Engine("reward model", shape, params, config, world_size, on_gpu)
    comps = engine.components(train=True)
    if engine.gather_bytes():
        comps.append(Component("ZeRO-3 gathered parameters", engine.gather_bytes(backward=True),
                               GATHER_HOW, "offload parameters or use ZeRO-2", phase="training"))
    seqs = 2 * opt.micro_batch_size
    a = hf_activation_bytes(shape, e, seqs, cfg.data.seq_length, ds.gradient_checkpointing)
    comps.append(Component("activations", a, f"{seqs} sequences x {cfg.data.seq_length} tokens"
                           + (", gradient checkpointing" if ds.gradient_checkpointing else ""),
                           "lower optim.micro_batch_size, or set deepspeed.gradient_checkpointing",
                           phase="training"))
    title = (f"reward model: {shape.layers} layers x {shape.hidden}, {params / 1e9:.2f}B params, "
             f"ZeRO-{ds.zero_stage}, {world_size} GPUs, micro-batch {opt.micro_batch_size} pair(s) x "
             f"{cfg.data.seq_length}, {'bf16' if e == 2 else 'fp32'}")
    return MemoryPlan(title, comps, gpu_bytes)


def _logits_bytes(shape: ModelShape, e: int, rows: int, seq: int, response: int, grad: bool) -> float:
    """Logits of ``rows`` sequences: the model's [rows, seq, V] output, and per response token
    the fp32 log-softmax of the log-probs (and, with gradients, the entropy's log-softmax, exp and
    product, all kept for backward)."""
    per_response = 4 + 4 + (8 if grad else 0)  # fp32 copy + log-softmax (+ entropy's two)
    return rows * shape.vocab * (seq * e + response * per_response)


def auto_generation_micro_batch(cfg, world_size: int, gpu_bytes: Optional[float], on_gpu: bool = True,
                                model_preset: Optional[str] = None) -> int:
    """``rollout.generation_micro_batch_size: auto``: the most rows per generation forward whose
    generation phase (KV cache, logits, the gathered actor) fits beside the resident engines.

    All of a rank's rows when no GPU size is known (CPU) or when they fit; otherwise the largest
    that fits, rounded down to whole prompts (a prompt's samples share a micro-batch); 1 if none
    fits (the plan then names what does not). The generation phase grows with the rows, so the
    largest fitting size is found by bisection."""
    rows = cfg.rollout_batch_per_rank(world_size)
    if gpu_bytes is None:
        return rows

    def fits(gen: int) -> bool:
        trial = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, generation_micro_batch_size=gen))
        plan = plan_ppo(trial, world_size, gpu_bytes, on_gpu, model_preset)
        return plan.resident + plan.phase_bytes().get("generation", 0.0) <= plan.usable

    if fits(rows):
        return rows
    lo, hi = 1, rows  # fits(lo) or lo == 1; not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    samples = cfg.rollout.samples_per_prompt
    return lo - lo % samples if lo >= samples else lo


def plan_ppo(cfg, world_size: int, gpu_bytes: Optional[float] = None, on_gpu: bool = True,
             model_preset: Optional[str] = None) -> MemoryPlan:
    """``PPOTrainConfig`` on ``world_size`` GPUs: four engines resident, then the largest of the
    phases generation (KV cache), scoring (four forwards), critic and actor training."""
    from megatron_qwen.rlhf.ppo.engines import engine_ds_configs

    r, p, m, en = cfg.rollout, cfg.ppo, cfg.models, cfg.engines
    if getattr(r, "generation_micro_batch_size", None) == "auto":
        gen = auto_generation_micro_batch(cfg, world_size, gpu_bytes, on_gpu, model_preset)
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(r, generation_micro_batch_size=gen))
        r = cfg.rollout
    e = _e(en.bf16, on_gpu)
    actor_shape = hf_shape(m.actor_path, model_preset, "models.actor_path")
    critic_shape = hf_shape(m.critic_path or m.reward_path, model_preset, "models.reward_path")
    ds = engine_ds_configs(cfg, world_size)
    engines = {
        "actor": Engine("actor", actor_shape, actor_shape.total_params(), ds["actor"], world_size,
                        on_gpu, "engines.actor_"),
        "critic": Engine("critic", critic_shape, critic_shape.total_params(heads_out=1), ds["critic"],
                         world_size, on_gpu, "engines.critic_"),
        "ref": Engine("ref", actor_shape, actor_shape.total_params(), ds["ref"], world_size, on_gpu,
                      "engines.ref_"),
        "reward": Engine("reward", critic_shape, critic_shape.total_params(heads_out=1), ds["reward"],
                         world_size, on_gpu, "engines.reward_"),
    }
    comps = []
    for name, eng in engines.items():
        comps += eng.components(train=name in ("actor", "critic"))
    rows = cfg.rollout_batch_per_rank(world_size)
    micro = max(1, p.mini_batch_size // world_size)
    S, R, P = r.max_prompt_length + r.max_new_tokens, r.max_new_tokens, r.max_prompt_length
    comps.append(Component("experience buffers", rows * (S * 16 + R * 4 * 8),
                           f"{rows} rows x {S} tokens (ids, mask) + per-token floats",
                           "lower rollout.prompts_per_step"))

    # generation: the rollout helper's rollout.generation_micro_batch_size (None: all rows)
    gen = getattr(r, "generation_micro_batch_size", None) or rows
    gather_once = getattr(r, "generation_gather_params", False)
    last_only = hasattr(r, "generation_micro_batch_size")  # that rollout keeps the last position only
    actor = engines["actor"]
    g = actor_shape
    kv = 2 * g.layers * gen * S * g.kv_groups * g.head_dim * e
    fix_gen = ("set rollout.generation_micro_batch_size lower (--generation-micro-batch-size)"
               if last_only else "lower rollout.prompts_per_step")
    comps.append(Component("KV cache", kv, f"2 x {g.layers} layers x {gen} rows x {S} tokens x "
                           f"{g.kv_groups * g.head_dim} x {e} B", fix_gen, phase="generation"))
    prefill_positions = 1 if last_only else P
    comps.append(Component("generation logits", gen * g.vocab * (prefill_positions * e + 4 * 7 + 8 + 1),
                           f"{gen} rows x {'last position' if last_only else f'{P} prompt positions'} x "
                           f"{g.vocab} vocab + fp32 top-p/sampling buffers", fix_gen, phase="generation"))
    comps.append(Component("generation activations", act.layer_bytes_per_token(g, e) * gen * P,
                           f"one layer's prefill of {gen} x {P} tokens (no grad)", fix_gen,
                           phase="generation"))
    if actor.zero_stage == 3:
        full = gather_once and actor.zero.get("offload_param") is None
        comps.append(Component("actor gathered parameters",
                               actor.params * e if full else actor.gather_bytes(),
                               "whole actor gathered once per rollout" if full
                               else "largest module + prefetch bucket",
                               "set rollout.generation_gather_params false (gathers per forward)"
                               if full else fix_gen, phase="generation"))

    # scoring: four no-grad forwards of `micro` rows; the actor's / reference's logits dominate
    gathered = max(eng.gather_bytes() for eng in engines.values())
    comps.append(Component("scoring logits", _logits_bytes(g, e, micro, S, R, grad=False),
                           f"{micro} rows x {S} tokens x {g.vocab} vocab", "lower ppo.mini_batch_size",
                           phase="scoring"))
    comps.append(Component("scoring activations", act.layer_bytes_per_token(g, e) * micro * S,
                           f"one layer of {micro} x {S} tokens (no grad)", "lower ppo.mini_batch_size",
                           phase="scoring"))
    if gathered:
        comps.append(Component("ZeRO-3 gathered parameters", gathered, "largest module + prefetch bucket",
                               "offload parameters", phase="scoring"))

    ckpt = en.gradient_checkpointing
    comps.append(Component("critic activations",
                           hf_activation_bytes(critic_shape, e, micro, S, ckpt),
                           f"{micro} rows x {S} tokens" + (", gradient checkpointing" if ckpt else ""),
                           "lower ppo.mini_batch_size, or set engines.gradient_checkpointing",
                           phase="critic training"))
    if engines["critic"].gather_bytes():
        comps.append(Component("critic gathered parameters", engines["critic"].gather_bytes(backward=True),
                               GATHER_HOW, "offload parameters", phase="critic training"))
    comps.append(Component("actor activations", hf_activation_bytes(g, e, micro, S, ckpt),
                           f"{micro} rows x {S} tokens" + (", gradient checkpointing" if ckpt else ""),
                           "lower ppo.mini_batch_size, or set engines.gradient_checkpointing",
                           phase="actor training"))
    comps.append(Component("actor logits", _logits_bytes(g, e, micro, S, R, grad=True),
                           f"{micro} rows x {S} tokens x {g.vocab} vocab (+ log-probs, entropy)",
                           "lower ppo.mini_batch_size", phase="actor training"))
    if cfg.ptx.ptx_data_path and cfg.ptx.ptx_coef > 0:
        rows_ptx = max(1, cfg.ptx.ptx_batch_size // world_size)
        s = cfg.ptx.ptx_seq_length
        comps.append(Component("ptx activations + logits",
                               hf_activation_bytes(g, e, rows_ptx, s, ckpt)
                               + _logits_bytes(g, e, rows_ptx, s, s, grad=False),
                               f"{rows_ptx} rows x {s} tokens in the same backward as the policy loss",
                               "lower ptx.ptx_batch_size or ptx.ptx_seq_length", phase="actor training"))
    if actor.gather_bytes():
        comps.append(Component("actor gathered parameters (training)", actor.gather_bytes(backward=True),
                               GATHER_HOW, "offload parameters", phase="actor training"))
    stages = "/".join(str(eng.zero_stage) for eng in engines.values())
    title = (f"PPO: actor {actor.params / 1e9:.2f}B, critic/reward {engines['critic'].params / 1e9:.2f}B, "
             f"ZeRO {stages} (actor/critic/ref/reward), {world_size} GPUs, {rows} rollout rows per GPU "
             f"(generation micro-batch {gen}), {P}+{R} tokens, mini-batch {micro} per GPU, "
             f"{'bf16' if e == 2 else 'fp32'}")
    return MemoryPlan(title, comps, gpu_bytes)
