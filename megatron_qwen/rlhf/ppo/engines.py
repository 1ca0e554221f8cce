"""The four PPO engines, each a DeepSpeed engine with its own config generated from the recipe.

    actor      Qwen2ForCausalLM from the SFT model       trained  (ZeRO 1/2/3, optional offload)
    critic     backbone + per-token value head from RM   trained  (ZeRO 1/2/3, optional offload)
    reference  frozen copy of the SFT model              inference (ZeRO-3 partitioned or stage 0)
    reward     backbone + reward head from RM export     inference (ZeRO-3 partitioned or stage 0)

Under ZeRO-3 the Hugging Face loaders run inside ``HfDeepSpeedConfig``, so ``from_pretrained``
builds the model already partitioned (``deepspeed.zero.Init``) instead of a full copy per rank.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_qwen.rlhf import hf_model
from megatron_qwen.rlhf.deepspeed_config import (init_inference_engine, init_train_engine,
                                                 make_ds_config, zero3_construction)
from megatron_qwen.rlhf.ppo.config import PPOTrainConfig


@dataclasses.dataclass
class Engines:
    actor: object  # DeepSpeedEngine
    critic: object
    ref: object
    reward: object
    ds_configs: dict  # name -> the DeepSpeed config it was built with
    reward_stats: Optional[dict]  # the RM export's saved reward statistics, if any


def engine_ds_configs(cfg: PPOTrainConfig, world_size: int) -> dict:
    """One DeepSpeed config per engine. Training engines step once per global mini-batch."""
    e = cfg.engines
    mini = cfg.ppo.mini_batch_size
    micro = mini // world_size
    common = dict(world_size=world_size, bf16=e.bf16)
    return {
        "actor": make_ds_config(micro_batch_size=micro, global_batch_size=mini, train=True,
                                zero_stage=e.actor_zero_stage, offload_optimizer=e.actor_offload_optimizer,
                                offload_param=e.actor_offload_param, gradient_clipping=cfg.optim.clip_grad,
                                **common),
        "critic": make_ds_config(micro_batch_size=micro, global_batch_size=mini, train=True,
                                 zero_stage=e.critic_zero_stage, offload_optimizer=e.critic_offload_optimizer,
                                 offload_param=e.critic_offload_param, gradient_clipping=cfg.optim.clip_grad,
                                 **common),
        "ref": make_ds_config(micro_batch_size=micro, global_batch_size=mini, train=False,
                              zero_stage=e.ref_zero_stage, offload_param=e.ref_offload_param, **common),
        "reward": make_ds_config(micro_batch_size=micro, global_batch_size=mini, train=False,
                                 zero_stage=e.reward_zero_stage, offload_param=e.reward_offload_param,
                                 **common),
    }


def build_engines(cfg: PPOTrainConfig, world_size: int, ref_path: Optional[str] = None,
                  reward_path: Optional[str] = None) -> Engines:
    """Load the four models from their directories and wrap each in its DeepSpeed engine.

    ``ref_path`` / ``reward_path`` replace the recipe's sources for the frozen engines (a
    checkpoint's self-contained copies)."""
    ds = engine_ds_configs(cfg, world_size)
    m, o = cfg.models, cfg.optim
    critic_path = m.critic_path or m.reward_path
    ref_path, reward_path = ref_path or m.actor_path, reward_path or m.reward_path
    adam = dict(weight_decay=o.weight_decay, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                warmup_steps=o.lr_warmup_steps)

    with zero3_construction(ds["actor"]):
        actor_model = hf_model.load_causal_lm(m.actor_path)
    if cfg.engines.gradient_checkpointing:
        actor_model.gradient_checkpointing_enable()
    actor = init_train_engine(actor_model, ds["actor"], lr=o.actor_lr, **adam)

    with zero3_construction(ds["critic"]):
        critic_model = hf_model.load_with_head(critic_path, require_head=True)
    if cfg.engines.gradient_checkpointing:
        critic_model.gradient_checkpointing_enable()
    critic = init_train_engine(critic_model, ds["critic"], lr=o.critic_lr, **adam)

    with zero3_construction(ds["ref"]):
        ref_model = hf_model.load_causal_lm(ref_path)
    ref = init_inference_engine(ref_model, ds["ref"])

    with zero3_construction(ds["reward"]):
        reward_model = hf_model.load_with_head(reward_path, require_head=True)
    reward = init_inference_engine(reward_model, ds["reward"])

    return Engines(actor=actor, critic=critic, ref=ref, reward=reward, ds_configs=ds,
                   reward_stats=hf_model.load_reward_stats(reward_path))

