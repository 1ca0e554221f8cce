"""The PPO recipe: one dataclass group per concern, read by ``megatron_qwen.config.load_config``.

Defaults are the report's section 3.2.2 numbers (KL 0.04, 2 samples per prompt, top-p 0.9,
value clip 0.15, 50 value-only steps, policy LR 1e-6, value LR 5e-6, GAE gamma 1 / lambda 0.95,
PPO-ptx on); every one of them is switchable from the recipe or the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from megatron_qwen.config import ConfigError
from megatron_qwen.memory_plan.start_check import MemoryPlanConfig


@dataclasses.dataclass
class ModelsConfig:
    """Where the four models come from (all in Hugging Face form)."""

    actor_path: Optional[str] = None  # the SFT model: actor and (frozen) reference start here
    reward_path: Optional[str] = None  # reward-model export: backbone + reward head (+ stats)
    critic_path: Optional[str] = None  # critic init; None = the reward model (report practice)
    tokenizer_path: Optional[str] = None  # None: the built-in Qwen tokenizer

    def validate(self) -> None:
        if not self.actor_path:
            raise ConfigError("models.actor_path is required (the SFT model in HF form)")
        if not self.reward_path:
            raise ConfigError("models.reward_path is required (the reward-model export directory)")


@dataclasses.dataclass
class RolloutConfig:
    """How responses are sampled (report: two per query, top-p 0.9)."""

    prompt_data_path: Optional[str] = None  # JSONL: {"prompt": str} | {"messages": [...]} | {"input_ids": [...]}
    prompts_per_step: int = 4  # global number of prompts per PPO step (all ranks together)
    samples_per_prompt: int = 2  # responses sampled per prompt
    top_p: float = 0.9  # nucleus sampling threshold
    temperature: float = 1.0  # sampling temperature
    max_prompt_length: int = 512  # longer prompts are cut from the left (the end is kept)
    max_new_tokens: int = 512  # longest response in tokens
    stop_token_id: Optional[int] = None  # None: the tokenizer's <|im_end|>
    pad_token_id: Optional[int] = None  # None: the tokenizer's <|endoftext|>
    # A response that reaches max_new_tokens without <|im_end|>: "penalty" replaces its reward-model
    # score by unfinished_penalty; "truncate" scores it as it is (it is still counted as truncated).
    unfinished_rule: str = "penalty"  # a response cut at max_new_tokens: penalty | truncate
    unfinished_penalty: float = -1.0  # the score given to an unfinished response under penalty
    rollout_seed: int = 1234  # base seed of each sequence's sampler
    # The KV cache and the sampling buffers scale with it: rows x (prompt + new tokens) x the cache
    # per token. auto: the most rows whose generation phase the memory plan fits in the GPU
    # (memory.gpu_memory_gib or the device's size; all of a rank's rows without a size, on CPU).
    generation_micro_batch_size: Optional[Union[int, str]] = "auto"  # rows per generation forward on each rank: N | auto (the memory plan's) | null (all at once)
    # ZeRO-3 actor: one full copy of the actor's weights per rank while generating, no per-token
    # all-gather.
    generation_gather_params: bool = True  # ZeRO-3: gather the actor once per rollout, not once per forward

    def validate(self) -> None:
        micro = self.generation_micro_batch_size
        if isinstance(micro, str):  # the command line and typed recipes give text: "8", "auto"
            text = micro.strip().lower()
            micro = "auto" if text == "auto" else int(text) if text.isdigit() else 0
        if micro is not None and micro != "auto" and (isinstance(micro, bool) or not isinstance(micro, int)
                                                      or micro < 1):
            raise ConfigError(f"rollout.generation_micro_batch_size={self.generation_micro_batch_size!r} "
                              "must be an integer >= 1, auto (the memory plan's size) or null (all of a "
                              "rank's rows in one batch)")
        self.generation_micro_batch_size = micro
        if self.samples_per_prompt < 1 or self.prompts_per_step < 1:
            raise ConfigError("rollout.samples_per_prompt and rollout.prompts_per_step must be >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature={self.temperature} must be > 0")
        if self.max_new_tokens < 1 or self.max_prompt_length < 1:
            raise ConfigError("rollout.max_new_tokens and rollout.max_prompt_length must be >= 1")
        if self.unfinished_rule not in ("penalty", "truncate"):
            raise ConfigError(f"rollout.unfinished_rule={self.unfinished_rule!r}: choose penalty or truncate")


REWARDS = ("model", "arithmetic")


@dataclasses.dataclass
class PPOConfig:
    """The PPO objective and its schedule."""

    kl_coef: float = 0.04  # weight of the per-token KL penalty to the reference
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    clip_ratio: float = 0.2  # policy ratio clip (epsilon)
    value_clip: float = 0.15  # value-function clip around the old values
    entropy_coef: float = 0.0  # entropy is always logged; a bonus only if > 0
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batch_size: int = 4  # sequences per optimizer step, all ranks together (global)
    value_warmup_steps: int = 50  # first steps train only the critic
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1
    normalize_reward: bool = True  # running mean across steps
    normalize_reward_std: bool = True  # also divide by the running std
    reward_clip: Optional[float] = None  # clip normalised scores to [-c, c]
    # model: the reward model's score (models.reward_path); arithmetic: 1 if the response answers
    # the prompt's "A op B" right, else 0 (megatron_qwen/rlhf/ppo/rule_reward.py)
    reward: str = "model"  # what scores a response: model (the reward model) | arithmetic (the rule)
    # arithmetic: the score of a wrong answer that starts with an integer (0: correctness only)
    arithmetic_format_credit: float = 0.0  # arithmetic rule: partial score for a wrong answer in the format

    def validate(self) -> None:
        if self.reward not in REWARDS:
            raise ConfigError(f"ppo.reward={self.reward!r}: choose {' or '.join(REWARDS)}")
        if not 0.0 <= self.arithmetic_format_credit < 1.0:
            raise ConfigError(f"ppo.arithmetic_format_credit={self.arithmetic_format_credit} must be in [0, 1) "
                              "(a right answer scores 1)")
        for name in ("kl_coef", "clip_ratio", "value_clip", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ppo.{name}={getattr(self, name)} must be >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("ppo.gamma and ppo.lam must be in [0, 1]")
        if self.ppo_epochs < 1 or self.mini_batch_size < 1:
            raise ConfigError("ppo.ppo_epochs and ppo.mini_batch_size must be >= 1")
        if self.value_warmup_steps < 0:
            raise ConfigError("ppo.value_warmup_steps must be >= 0")
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise ConfigError(f"ppo.reward_clip={self.reward_clip} must be > 0 (or null for no clipping)")


@dataclasses.dataclass
class PtxConfig:
    """PPO-ptx: a language-modelling loss on pretraining data, added to the actor loss."""

    ptx_data_path: Optional[str] = None  # Megatron indexed dataset prefix (PREFIX.bin / PREFIX.idx)
    ptx_coef: float = 0.5  # weight of the LM loss; the term is off without ptx_data_path
    ptx_seq_length: int = 512  # tokens per pretraining sequence
    ptx_batch_size: int = 4  # pretraining sequences per actor step, all ranks together (global)

    def validate(self) -> None:
        if self.ptx_coef < 0:
            raise ConfigError(f"ptx.ptx_coef={self.ptx_coef} must be >= 0")
        if self.ptx_seq_length < 2 or self.ptx_batch_size < 1:
            raise ConfigError("ptx.ptx_seq_length must be >= 2 and ptx.ptx_batch_size >= 1")


@dataclasses.dataclass
class EnginesConfig:
    """DeepSpeed layout of each engine. Actor and critic train (ZeRO 1/2/3); reference and
    reward are inference engines (ZeRO-3 partitioned, or 0 = a full copy per rank)."""

    actor_zero_stage: int = 2  # actor's ZeRO stage (1-3)
    critic_zero_stage: int = 2  # critic's ZeRO stage (1-3)
    ref_zero_stage: int = 3  # reference's ZeRO stage (3, or 0: a full copy per rank)
    reward_zero_stage: int = 3  # reward model's ZeRO stage (3, or 0: a full copy per rank)
    actor_offload_optimizer: bool = False  # actor's optimizer state in CPU memory
    actor_offload_param: bool = False  # ZeRO-3 only
    critic_offload_optimizer: bool = False  # critic's optimizer state in CPU memory
    critic_offload_param: bool = False  # critic's parameters in CPU memory (ZeRO-3 only)
    ref_offload_param: bool = False  # ZeRO-3 only
    reward_offload_param: bool = False  # reward model's parameters in CPU memory (ZeRO-3 only)
    bf16: bool = False  # on for GPUs; CPU runs stay in fp32
    gradient_checkpointing: bool = False  # recompute actor/critic activations in the backward pass

    def validate(self) -> None:
        for name in ("actor_zero_stage", "critic_zero_stage"):
            if getattr(self, name) not in (0, 1, 2, 3):
                raise ConfigError(f"engines.{name}={getattr(self, name)}: choose 0, 1, 2 or 3")
        for name in ("ref_zero_stage", "reward_zero_stage"):
            if getattr(self, name) not in (0, 3):
                raise ConfigError(f"engines.{name}={getattr(self, name)}: inference engines use 0 or 3")
        for who in ("actor", "critic", "ref", "reward"):
            if getattr(self, f"{who}_offload_param") and getattr(self, f"{who}_zero_stage") != 3:
                raise ConfigError(f"engines.{who}_offload_param needs {who}_zero_stage=3")


@dataclasses.dataclass
class OptimConfig:
    """One AdamW per trained engine (report: policy 1e-6, value 5e-6, constant)."""

    actor_lr: float = 1e-6  # actor learning rate (constant)
    critic_lr: float = 5e-6  # critic learning rate (constant)
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 1.0  # clip each engine's gradient norm to this
    lr_warmup_steps: int = 0  # optimizer steps of linear warm-up, then constant

    def validate(self) -> None:
        if self.actor_lr < 0 or self.critic_lr < 0:
            raise ConfigError("optim.actor_lr and optim.critic_lr must be >= 0")


@dataclasses.dataclass
class TrainConfig:
    """Run length, checkpoints, logging."""

    train_iters: int = 1000  # PPO steps (one rollout batch each)
    seed: int = 1234  # seed of the heads' init and the prompt order
    save: Optional[str] = None  # checkpoint directory
    save_interval: int = 100  # PPO steps between checkpoints
    save_frozen_engines: bool = True  # also save reference and reward engines
    load: Optional[str] = None  # resume from this checkpoint directory (latest tag)
    export_dir: Optional[str] = None  # actor in HF form at the end of the run
    log_interval: int = 1  # PPO steps between log lines
    tensorboard_dir: Optional[str] = None  # write TensorBoard events here
    wandb_project: Optional[str] = None  # None: wandb off
    wandb_mode: str = "offline"  # offline unless configured
    metrics_jsonl: Optional[str] = None  # one JSON line of metrics per step (rank 0)

    def validate(self) -> None:
        if self.train_iters < 0 or self.save_interval < 1 or self.log_interval < 1:
            raise ConfigError("train.train_iters >= 0, train.save_interval >= 1, train.log_interval >= 1")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"train.wandb_mode={self.wandb_mode!r}: choose offline, online or disabled")


@dataclasses.dataclass
class PPOTrainConfig:
    """PPO with four DeepSpeed engines: actor, critic, reference, reward (report section 3.2.2)."""

    models: ModelsConfig = dataclasses.field(default_factory=ModelsConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    ptx: PtxConfig = dataclasses.field(default_factory=PtxConfig)
    engines: EnginesConfig = dataclasses.field(default_factory=EnginesConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    memory: MemoryPlanConfig = dataclasses.field(default_factory=MemoryPlanConfig)

    def validate(self) -> None:
        if not self.rollout.prompt_data_path:
            raise ConfigError("rollout.prompt_data_path is required (JSONL of prompts)")

    def rollout_batch_per_rank(self, world_size: int) -> int:
        """Sequences each rank generates per step; prompts are dealt to ranks round-robin."""
        prompts, samples = self.rollout.prompts_per_step, self.rollout.samples_per_prompt
        if prompts % world_size:
            raise ConfigError(f"rollout.prompts_per_step={prompts} is not divisible by the "
                              f"{world_size} data-parallel ranks")
        total, mini = prompts * samples, self.ppo.mini_batch_size
        if total % mini or mini % world_size:
            raise ConfigError(f"ppo.mini_batch_size={mini} must divide the {total} sequences of a "
                              f"step and be divisible by the {world_size} data-parallel ranks")
        return total // world_size
