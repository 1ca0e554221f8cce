"""PPO (report section 3.2.2) with four DeepSpeed engines: actor, critic, reference, reward.

Modules: ``config`` (the recipe groups), ``math`` (GAE, KL-shaped reward, losses, running
normaliser), ``prompts`` (the prompt set and its order), ``ptx`` (pretraining batches for PPO-ptx),
``engines`` (DeepSpeed configs and engine init), ``rollout`` (KV-cached sampling that is safe under
ZeRO-3), ``experience`` (scoring a rollout into advantages), ``trainer`` (the loop), ``checkpoint``
(save / resume / HF export), ``metrics`` (stdout, TensorBoard, wandb).
"""
