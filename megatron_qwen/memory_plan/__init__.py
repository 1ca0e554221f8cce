"""Peak memory per GPU, by component, predicted from a trainer's config before launch.

``plan_for(cfg, world_size, gpu_bytes)`` takes the config object a trainer runs with
(``PretrainConfig`` for pretraining and SFT, ``RewardModelConfig``, ``PPOTrainConfig``) and
returns a :class:`MemoryPlan`. ``tools/plan_memory.py`` prints it; every trainer checks it at
start (:mod:`start_check`). How the figures are derived and validated: docs/memory.md.
"""

from __future__ import annotations

from typing import Optional

from megatron_qwen.memory_plan.plan import GIB, Component, MemoryPlan


def plan_for(cfg, world_size: int, gpu_bytes: Optional[float] = None, on_gpu: bool = True,
             model_preset: Optional[str] = None) -> MemoryPlan:
    """The plan of ``cfg`` on ``world_size`` GPUs of ``gpu_bytes`` each (None: fit not judged).
    ``on_gpu=False`` plans the fp32 run a CPU machine makes of the same recipe;
    ``model_preset`` names the shape of the HF models of RM/PPO recipes whose directories are
    not there yet."""
    from megatron_qwen.rlhf.ppo.config import PPOTrainConfig
    from megatron_qwen.rlhf.reward_config import RewardModelConfig
    from megatron_qwen.training.config import PretrainConfig

    if isinstance(cfg, PretrainConfig):
        from megatron_qwen.memory_plan.megatron_plan import plan_pretrain

        return plan_pretrain(cfg, world_size, gpu_bytes, on_gpu)
    if isinstance(cfg, RewardModelConfig):
        from megatron_qwen.memory_plan.deepspeed_plan import plan_reward_model

        return plan_reward_model(cfg, world_size, gpu_bytes, on_gpu, model_preset)
    if isinstance(cfg, PPOTrainConfig):
        from megatron_qwen.memory_plan.deepspeed_plan import plan_ppo

        return plan_ppo(cfg, world_size, gpu_bytes, on_gpu, model_preset)
    raise TypeError(f"no memory plan for {type(cfg).__name__}")


def check_trainer_start(cfg, world_size: int, rank: int = 0) -> Optional[MemoryPlan]:
    """The start check of every trainer: ``cfg.memory`` says the GPU size and whether to skip."""
    from megatron_qwen.memory_plan.start_check import check_at_start

    return check_at_start(cfg.memory, lambda size, on_gpu: plan_for(cfg, world_size, size, on_gpu),
                          rank=rank)


__all__ = ["GIB", "Component", "MemoryPlan", "plan_for", "check_trainer_start"]
