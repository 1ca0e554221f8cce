"""AdamW and its LR schedule, both megatron-core's (report section 2.4).

``get_megatron_optimizer`` gives AdamW (FusedAdam on GPU, torch's AdamW on CPU) with FP32 master
weights under BF16, the distributed optimizer when asked, gradient clipping, and no weight decay on
1-D parameters and biases (norm weights, the QKV bias). ``OptimizerParamScheduler`` gives linear
warm-up then cosine decay to ``min_lr``. Its step counter is in iterations: the LR used by
iteration ``i`` (1-based) is the schedule at ``i``.
"""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_qwen.runtime import mcore_fixes


def optimizer_config(cfg, use_bf16: bool) -> OptimizerConfig:
    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=use_bf16,
        params_dtype=torch.bfloat16 if use_bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )


def warmup_iters(cfg) -> int:
    o = cfg.optim
    decay = o.lr_decay_iters or cfg.train.train_iters
    if o.lr_warmup_fraction is not None:
        return int(o.lr_warmup_fraction * decay)
    return o.lr_warmup_iters


def build_scheduler(cfg, optimizer) -> OptimizerParamScheduler:
    o = cfg.optim
    decay = o.lr_decay_iters or cfg.train.train_iters
    warm = min(warmup_iters(cfg), decay - 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=o.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warm,
        lr_decay_steps=decay,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.train_iters,
        wd_incr_style="constant",
        # the recipe's schedule wins over a checkpoint's (a resumed run may change --train-iters)
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def build_optimizer(cfg, model_chunks, use_bf16: bool):
    """(MegatronOptimizer, OptimizerParamScheduler) for the DDP-wrapped ``model_chunks``."""
    mcore_fixes.apply()  # the distributed optimizer's checkpoint bugs, whoever built the groups
    optimizer = get_megatron_optimizer(optimizer_config(cfg, use_bf16), model_chunks)
    return optimizer, build_scheduler(cfg, optimizer)


def reference_lr(iteration: int, max_lr: float, min_lr: float, warmup: int, decay: int,
                 style: str = "cosine", init_lr: float = 0.0) -> float:
    """The schedule in closed form (what the tests hold megatron-core's scheduler to)."""
    if warmup > 0 and iteration <= warmup:
        return init_lr + (max_lr - init_lr) * iteration / warmup
    if style == "constant":
        return max_lr
    if iteration > decay:
        return min_lr
    ratio = (iteration - warmup) / (decay - warmup)
    coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0) if style == "cosine" else 1.0 - ratio
    return min_lr + coeff * (max_lr - min_lr)
