"""The memory plans of the DeepSpeed trainers: the reward model (one engine) and PPO (four).

The models are transformers' Qwen2 (``rlhf/hf_model.py``); activations per token are those of
:mod:`activations`; with gradient checkpointing each layer keeps only its input, and backward
recomputes one layer at a time.
"""

from __future__ import annotations

from typing import Optional

from megatron_qwen.memory_plan import activations as act
from megatron_qwen.memory_plan.plan import Component, MemoryPlan
from megatron_qwen.memory_plan.shape import ModelShape, hf_shape
from megatron_qwen.memory_plan.zero import Engine


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
    ds, opt = cfg.deepspeed, cfg.optim
    shape = hf_shape(cfg.model.model_path, model_preset, "model.model_path")
    e = _e(ds.bf16, on_gpu)
    params = shape.total_params(heads_out=1)
    engine = Engine("reward model", shape, params, ds.zero_stage, True, e, world_size,
                    ds.offload_optimizer, ds.offload_param)
    comps = engine.components()
    if engine.gather_bytes():
        comps.append(Component("ZeRO-3 gathered parameters", engine.gather_bytes(),
                               "largest module + prefetch bucket", "offload parameters or use ZeRO-2",
                               phase="training"))
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
