"""Turn a rollout into PPO training data: score it with the four engines, then shape rewards.

Per response token t (the state is the prefix before t):
    old_logprob  actor's log p(t) at rollout time      ref_logprob  the frozen reference's
    old_value    critic's value of the prefix          reward       -kl_coef * (logp - ref) (+ score at the end)
and per sequence the reward model's score at the end token, normalised by the running statistics.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_qwen.rlhf.heads import position_ids_from_mask
from megatron_qwen.rlhf.ppo import math as ppo_math
from megatron_qwen.rlhf.ppo.config import PPOConfig, RolloutConfig
from megatron_qwen.rlhf.ppo.rollout import Rollout


@dataclasses.dataclass
class Experience:
    sequences: torch.Tensor  # [b, P + R]
    attention_mask: torch.Tensor  # [b, P + R]
    prompt_length: int
    mask: torch.Tensor  # [b, R] float response mask
    old_logprobs: torch.Tensor  # [b, R]
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores_raw: torch.Tensor  # [b] reward-model scores
    scores: torch.Tensor  # [b] after normalisation, clipping and the unfinished rule
    kl: torch.Tensor  # [b, R] per-token logp - ref_logp
    finished: torch.Tensor  # [b] bool

    def rows(self, start: int, stop: int) -> "Experience":
        """Rows [start, stop): a mini-batch."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[start:stop] if isinstance(v, torch.Tensor) else v
        return Experience(**out)


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Logits that predict each response token: positions P-1 .. P+R-2."""
    out = model(input_ids=sequences, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.logits[:, prompt_length - 1:-1]


def response_values(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Critic values of the prefixes that precede each response token."""
    values = model(sequences, attention_mask, position_ids_from_mask(attention_mask))
    return values[:, prompt_length - 1:-1]


@torch.no_grad()
def make_experience(rollout: Rollout, engines, normaliser: ppo_math.RunningMeanStd,
                    ppo: PPOConfig, rollout_cfg: RolloutConfig, micro_batch: int,
                    rule_reward=None) -> tuple[Experience, dict]:
    """Score ``rollout`` with actor, reference, critic and reward; return the experience and the
    metrics of this stage. ``micro_batch`` bounds the rows per forward pass. ``rule_reward``
    (``(sequences, attention_mask, prompt_length) -> scores``) replaces the reward engine."""
    seqs, attn, P = rollout.sequences, rollout.attention_mask, rollout.prompt_length
    mask = rollout.response_mask.to(seqs.device)
    responses = seqs[:, P:]
    logp, ref_logp, values, scores_raw = [], [], [], []
    for model in (engines.actor.module, engines.critic.module):
        model.eval()
    for s in range(0, seqs.shape[0], micro_batch):
        sl = slice(s, s + micro_batch)
        logp.append(ppo_math.token_logprobs(
            response_logits(engines.actor.module, seqs[sl], attn[sl], P), responses[sl]))
        ref_logp.append(ppo_math.token_logprobs(
            response_logits(engines.ref.module, seqs[sl], attn[sl], P), responses[sl]))
        values.append(response_values(engines.critic.module, seqs[sl], attn[sl], P).float())
        if rule_reward is not None:
            scores_raw.append(rule_reward(seqs[sl], attn[sl], P).float())
        else:  # the reward is read at the last real token: <|im_end|> for a finished response
            scores_raw.append(engines.reward.module.reward(seqs[sl], attn[sl]).float())
    for model in (engines.actor.module, engines.critic.module):
        model.train()
    logp, ref_logp = torch.cat(logp) * mask, torch.cat(ref_logp) * mask
    values, scores_raw = torch.cat(values) * mask, torch.cat(scores_raw)

    finished = rollout.finished.to(seqs.device)
    if ppo.normalize_reward:
        normaliser.update(scores_raw)
        scores = normaliser.normalize(scores_raw, use_std=ppo.normalize_reward_std)
    else:
        scores = scores_raw.clone()
    scores = ppo_math.clip_scores(scores, ppo.reward_clip)
    if rollout_cfg.unfinished_rule == "penalty":
        scores = torch.where(finished, scores, torch.full_like(scores, rollout_cfg.unfinished_penalty))

    rewards, kl = ppo_math.kl_shaped_rewards(scores, logp, ref_logp, mask, ppo.kl_coef)
    advantages, returns = ppo_math.gae(rewards, values, mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = ppo_math.whiten(advantages, mask)

    exp = Experience(sequences=seqs, attention_mask=attn, prompt_length=P, mask=mask,
                     old_logprobs=logp, ref_logprobs=ref_logp, old_values=values,
                     advantages=advantages, returns=returns, scores_raw=scores_raw, scores=scores,
                     kl=kl, finished=finished)
    seq_ones = torch.ones_like(scores_raw)
    lengths = mask.sum(1)
    metrics = {
        "reward/raw": ppo_math.masked_mean(scores_raw, seq_ones, global_=True).item(),
        "reward/normalized": ppo_math.masked_mean(scores, seq_ones, global_=True).item(),
        "reward/running_mean": normaliser.mean,
        "reward/running_std": normaliser.std,
        # KL(actor || reference) of a sequence: the sum over its tokens of the k3 estimator
        # (non-negative per token, docs/ppo.md), averaged over sequences; kl/k1 is the sum of
        # logp - logp_ref that the penalty charges (unbiased, but negative on many samples)
        "kl": ppo_math.masked_mean((ppo_math.kl_k3(logp, ref_logp) * mask).sum(1), seq_ones, global_=True).item(),
        "kl/k1": ppo_math.masked_mean(kl.sum(1), seq_ones, global_=True).item(),
        "response/length": ppo_math.masked_mean(lengths, seq_ones, global_=True).item(),
        "response/truncated_share": ppo_math.masked_mean((~finished).float(), seq_ones, global_=True).item(),
        "values/mean": ppo_math.masked_mean(values, mask, global_=True).item(),
        "returns/mean": ppo_math.masked_mean(returns, mask, global_=True).item(),
    }
    return exp, metrics
