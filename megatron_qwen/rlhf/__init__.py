"""RLHF on DeepSpeed ZeRO with the Hugging Face form of Qwen: the reward model and PPO.

- ``heads``: the scalar head (reward at the end token, value per token) and pooling.
- ``hf_model``: load the qwen2 directory, wrap it with the head, export/load back.
- ``deepspeed_config``: one DeepSpeed config per engine from the recipe, engine init.
- ``reward_*``: the reward-model trainer (config, data batching, loop, scoring).
- ``ppo``: the PPO trainer (its own subpackage).
"""
