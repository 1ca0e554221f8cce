"""The PPO loop: rollout -> score -> several epochs of critic/actor mini-batch updates.

One step:
  1. take ``prompts_per_step`` prompts (dealt round-robin to ranks), ``samples_per_prompt`` each;
  2. sample responses through the rollout generator (rlhf/ppo/generator.py)  -> time/generate
  3. actor/ref log-probs, critic values, reward-model scores; KL-shaped reward, GAE -> time/score
  4. ``ppo_epochs`` passes over ``mini_batch_size`` mini-batches: critic step (clipped value loss);
     actor step (clipped policy loss + ptx_coef * LM loss on pretraining data) once the
     ``value_warmup_steps`` are over                                            -> time/train
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_qwen.config import to_dict
from megatron_qwen.rlhf.ppo import checkpoint
from megatron_qwen.rlhf.ppo import math as ppo_math
from megatron_qwen.rlhf.ppo.config import PPOTrainConfig
from megatron_qwen.rlhf.ppo.engines import Engines, build_engines
from megatron_qwen.rlhf.ppo.experience import Experience, make_experience, response_logits, response_values
from megatron_qwen.rlhf.ppo.metrics import MetricsLogger
from megatron_qwen.rlhf.ppo.prompts import PromptSampler, load_prompts
from megatron_qwen.rlhf.ppo.ptx import PtxBatches
from megatron_qwen.rlhf.ppo.generator import GenerationRequest, InProcessGenerator, RolloutGenerator
from megatron_qwen.rlhf.ppo.rule_reward import ArithmeticReward
from megatron_qwen.runtime.collectives import all_reduce_scalars


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sample_seed(base: int, step: int, global_index: int) -> int:
    """The seed of one sequence's sampler: a function of its place in the global batch only."""
    return int(np.random.SeedSequence([base, step, global_index]).generate_state(1)[0])


def generation_micro_batch(cfg: PPOTrainConfig, world: int, rank: int) -> Optional[int]:
    """The rollout's rows per generation forward; ``auto`` asks the memory plan (all rows on CPU,
    where no GPU size bounds them, unless ``memory.gpu_memory_gib`` is given)."""
    micro = cfg.rollout.generation_micro_batch_size
    if micro != "auto":
        return micro
    from megatron_qwen.config import ConfigError
    from megatron_qwen.memory_plan.deepspeed_plan import auto_generation_micro_batch
    from megatron_qwen.memory_plan.start_check import gpu_bytes

    size = gpu_bytes(cfg.memory.gpu_memory_gib)
    try:
        micro = auto_generation_micro_batch(cfg, world, size)  # a GPU's plan, as the start check's
    except ConfigError as exc:  # no plan (e.g. an actor without config.json): one batch, said once
        micro = cfg.rollout_batch_per_rank(world)
        if rank == 0:
            print(f"generation micro-batch: auto -> all {micro} rows (no memory plan: {exc})", flush=True)
        return micro
    if rank == 0:
        where = f"{size / 2 ** 30:.0f} GiB per GPU" if size is not None else "no GPU size: all rows"
        print(f"generation micro-batch: auto -> {micro} of {cfg.rollout_batch_per_rank(world)} rows "
              f"per rank (memory plan, {where})", flush=True)
    return micro


class PPOTrainer:
    def __init__(self, cfg: PPOTrainConfig, engines: Optional[Engines] = None, tokenizer=None,
                 generator: Optional[RolloutGenerator] = None):
        self.cfg = cfg
        self.rank, self.world = _world()
        self.per_rank = cfg.rollout_batch_per_rank(self.world)
        torch.manual_seed(cfg.train.seed)
        # on resume, the frozen engines come from the checkpoint's own copies
        self.engines = engines or build_engines(cfg, self.world, **checkpoint.frozen_sources(cfg.train.load))
        self.device = self.engines.actor.device
        self.generator = generator or InProcessGenerator(
            self.engines.actor, micro_batch_size=generation_micro_batch(cfg, self.world, self.rank),
            gather_params=cfg.rollout.generation_gather_params)
        vocab = self.engines.actor.module.config.vocab_size
        r = cfg.rollout
        arithmetic = cfg.ppo.reward == "arithmetic"
        if tokenizer is None and (r.stop_token_id is None or r.pad_token_id is None or arithmetic):
            from megatron_qwen.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.models.tokenizer_path)
        self.stop_id = r.stop_token_id if r.stop_token_id is not None else tokenizer.im_end_id
        self.pad_id = r.pad_token_id if r.pad_token_id is not None else tokenizer.eod_id
        self.prompts, self.prompt_report = load_prompts(r.prompt_data_path, tokenizer,
                                                        r.max_prompt_length, vocab_size=vocab)
        if self.rank == 0:
            rep = self.prompt_report
            print(f"prompts: {rep['read']} read from {r.prompt_data_path}, {rep['skipped']} skipped "
                  f"{rep['reasons'] or ''}", flush=True)
        self.sampler = PromptSampler(len(self.prompts), cfg.train.seed)
        self.ptx = None
        if cfg.ptx.ptx_data_path and cfg.ptx.ptx_coef > 0:
            self.ptx = PtxBatches(cfg.ptx.ptx_data_path, cfg.ptx.ptx_seq_length, cfg.ptx.ptx_batch_size,
                                  cfg.train.seed, self.pad_id, vocab_size=vocab)
        self.rule_reward = ArithmeticReward(tokenizer, cfg.ppo.arithmetic_format_credit) if arithmetic else None
        stats = None if arithmetic else self.engines.reward_stats
        # start from the reward model's own statistics when its export has them
        self.normaliser = ppo_math.RunningMeanStd(
            mean=stats["mean"], var=float(stats["std"]) ** 2, count=float(stats.get("count", 1))
        ) if stats else ppo_math.RunningMeanStd()
        self.step = 0
        self.logger = MetricsLogger(cfg.train, to_dict(cfg), self.rank)
        if cfg.train.load:
            self.resume(cfg.train.load)

    # ------------------------------------------------------------------ state

    def trainer_state(self) -> dict:
        return {"step": self.step, "prompt_position": self.sampler.position,
                "normaliser": self.normaliser.state_dict()}

    def resume(self, load_dir: str) -> bool:
        state = checkpoint.load(load_dir, self.engines)
        if state is None:
            return False
        self.step = int(state["step"])
        self.sampler.position = int(state["prompt_position"])
        self.normaliser.load_state_dict(state["normaliser"])
        if self.rank == 0:
            print(f"resumed from {checkpoint.latest(load_dir)} at step {self.step}", flush=True)
        return True

    def _global_sum(self, x: float) -> float:
        """``x`` summed over the data-parallel ranks (reduced on the actor's device)."""
        return all_reduce_scalars([x], device=self.device)[0]

    def save(self) -> None:
        checkpoint.save(self.cfg.train.save, self.step, self.engines, self.trainer_state(), self.cfg,
                        save_frozen=self.cfg.train.save_frozen_engines)

    # ------------------------------------------------------------------ one step

    def rollout(self):
        r = self.cfg.rollout
        global_prompts = self.sampler.next_indices(r.prompts_per_step)
        # prompt slots rank, rank + W, ...: the local row order then matches the global order of
        # every mini-batch, so 1 and N processes train on the same mini-batches
        slots = list(range(self.rank, r.prompts_per_step, self.world))
        prompts, seeds, index = [], [], []
        for slot in slots:
            for j in range(r.samples_per_prompt):
                prompts.append(self.prompts[global_prompts[slot]])
                seeds.append(sample_seed(r.rollout_seed, self.step, slot * r.samples_per_prompt + j))
                index.append(global_prompts[slot])
        return self.generator.generate(GenerationRequest(
            prompts=prompts, seeds=seeds, prompt_index=index, max_new_tokens=r.max_new_tokens,
            stop_token_id=self.stop_id, pad_token_id=self.pad_id, top_p=r.top_p,
            temperature=r.temperature))

    def _ptx_loss(self, update: int) -> torch.Tensor:
        """Next-token loss of the actor on a fresh pretraining batch (global token mean)."""
        batch = self.ptx.batch(update, self.rank, self.world)
        ids, attn = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        mask = attn[:, 1:].float()
        num_tokens = torch.tensor(self._global_sum(float(mask.sum())) / self.world, device=self.device)
        logits = self.engines.actor(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        nll = -ppo_math.token_logprobs(logits, ids[:, 1:])
        return ppo_math.token_mean(nll, mask, num_tokens)

    def train_on(self, exp: Experience) -> dict:
        """``ppo_epochs`` passes of mini-batch updates over this rank's experience."""
        p = self.cfg.ppo
        micro = p.mini_batch_size // self.world
        update_actor = ppo_math.policy_update_enabled(self.step, p.value_warmup_steps)
        actor, critic = self.engines.actor, self.engines.critic
        sums: dict = {}

        def add(k, v):
            sums.setdefault(k, []).append(float(v))

        updates_per_step = p.ppo_epochs * (exp.sequences.shape[0] // micro)
        for _ in range(p.ppo_epochs):
            for s in range(0, exp.sequences.shape[0], micro):
                mb = exp.rows(s, s + micro)
                # loss / (global tokens / W): DeepSpeed's gradient mean is then the global token mean
                n_tok = torch.tensor(self._global_sum(float(mb.mask.sum())) / self.world, device=self.device)

                values = response_values(critic, mb.sequences, mb.attention_mask, mb.prompt_length).float()
                v_loss, v_info = ppo_math.value_loss(values, mb.old_values, mb.returns, mb.mask,
                                                     p.value_clip, num_tokens=n_tok)
                critic.backward(v_loss)
                critic.step()
                add("loss/value", self._global_sum(float(v_loss.detach())) / self.world)
                add("clipfrac/value", v_info["value_clipfrac"])

                with torch.set_grad_enabled(update_actor):  # warm-up: entropy is only logged
                    logits = response_logits(actor, mb.sequences, mb.attention_mask, mb.prompt_length)
                    logp = ppo_math.token_logprobs(logits, mb.sequences[:, mb.prompt_length:])
                    ent = ppo_math.entropy(logits)
                add("entropy", ppo_math.masked_mean(ent.detach(), mb.mask, global_=True))
                if not update_actor:
                    continue
                pg_loss, pg_info = ppo_math.policy_loss(logp, mb.old_logprobs, mb.advantages, mb.mask,
                                                        p.clip_ratio, num_tokens=n_tok)
                loss = pg_loss
                if p.entropy_coef > 0:
                    loss = loss - p.entropy_coef * ppo_math.token_mean(ent, mb.mask, n_tok)
                if self.ptx is not None:
                    ptx_loss = self._ptx_loss(self.step * updates_per_step + len(sums["loss/value"]) - 1)
                    loss = loss + self.cfg.ptx.ptx_coef * ptx_loss
                    add("loss/ptx", self._global_sum(float(ptx_loss.detach())) / self.world)
                actor.backward(loss)
                actor.step()
                add("loss/policy", self._global_sum(float(pg_loss.detach())) / self.world)
                add("clipfrac/policy", pg_info["policy_clipfrac"])
                add("approx_kl", pg_info["approx_kl"])
        if update_actor:
            self.generator.push_weights(actor)  # the next rollout samples the updated policy
        out = {k: float(np.mean(v)) for k, v in sums.items()}
        out["policy_updated"] = float(update_actor)
        out["lr/actor"] = actor.get_lr()[0]
        out["lr/critic"] = critic.get_lr()[0]
        return out

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        rollout = self.rollout()
        t1 = time.perf_counter()
        micro = max(1, self.cfg.ppo.mini_batch_size // self.world)
        exp, metrics = make_experience(rollout, self.engines, self.normaliser, self.cfg.ppo,
                                       self.cfg.rollout, micro, rule_reward=self.rule_reward)
        t2 = time.perf_counter()
        metrics.update(self.train_on(exp))
        t3 = time.perf_counter()
        tokens = self._global_sum(float(rollout.attention_mask.sum()))
        metrics.update({"time/generate": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2,
                        "time/step": t3 - t0, "tokens_per_s": tokens / (t3 - t0),
                        "generated_tokens_per_s": self._global_sum(float(rollout.response_mask.sum())) / (t1 - t0)})
        self.step += 1
        return metrics

    def fit(self) -> list[dict]:
        """Train until ``train_iters``; save on the interval and at the end; export the actor."""
        t = self.cfg.train
        history = []
        while self.step < t.train_iters:
            metrics = self.train_step()
            history.append(metrics)
            self.logger.log(self.step, metrics)
            if t.save and (self.step % t.save_interval == 0 or self.step == t.train_iters):
                self.save()
        if t.export_dir:
            checkpoint.export_actor(self.engines.actor, t.export_dir, self.cfg.models.actor_path)
        self.logger.close()
        return history
