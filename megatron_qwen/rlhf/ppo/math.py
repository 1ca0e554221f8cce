"""The PPO arithmetic, free of engines: KL-shaped rewards, GAE, the two clipped losses, the
running reward normaliser and the value warm-up switch.

Shapes: every per-token tensor is ``[batch, response_len]`` and comes with a float ``mask`` of the
same shape (1 on response tokens that exist, 0 on padding after the end token). Sequence-level
tensors are ``[batch]``. Statistics that must be identical on every data-parallel rank (advantage
whitening, the reward normaliser) reduce over ``torch.distributed`` when it is initialised, so one
process and N processes see the same numbers for the same global batch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_qwen.runtime.collectives import is_multi_process


def _dist_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over data-parallel ranks (a no-op in a single process). ``t`` is computed from
    the batch, so it is on the device the group communicates on."""
    if is_multi_process():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: Optional[torch.Tensor | float]) -> torch.Tensor:
    """``sum(x * mask) / num_tokens``; ``num_tokens=None`` is this batch's own token count.

    A loss divided by the *global* token count over the data-parallel size makes DeepSpeed's
    gradient average equal to the token mean of the whole global mini-batch (so one process and
    N processes take the same step)."""
    if num_tokens is None:
        return masked_mean(x, mask)
    return (x * mask).sum() / num_tokens


def masked_mean(x: torch.Tensor, mask: torch.Tensor, global_: bool = False) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1; ``global_`` takes it over all ranks."""
    stats = torch.stack([(x * mask).sum(), mask.sum()]).double()
    if global_:
        stats = _dist_sum(stats)
    return (stats[0] / stats[1].clamp(min=1)).to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Standardise ``x`` over the masked entries of the *global* batch (advantage whitening)."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    stats = _dist_sum(stats)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    # unbiased variance, like the usual implementations (n / (n - 1) correction)
    var = (stats[1] / n - mean * mean) * (n / (n - 1).clamp(min=1))
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var.clamp(min=0).to(x.dtype) + eps)
    if not shift_mean:
        out = out + mean.to(x.dtype)
    return out * mask


# --------------------------------------------------------------------------- rewards


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * (logp - logp_ref)`` on every response token, plus the
    (normalised) reward-model score on the last real token of each response.

    Returns ``(rewards, kl)`` with ``kl`` the per-token estimate ``logp - logp_ref`` (masked).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(dim=1).long()
    if (lengths < 1).any():
        raise ValueError("kl_shaped_rewards: a response has no tokens (mask row is all zero)")
    last = lengths - 1
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(actor || reference) from tokens sampled by the actor: with
    ``log_r = logp_ref - logp``, ``k3 = exp(log_r) - 1 - log_r`` (Schulman, "Approximating KL
    divergence", 2020). It is >= 0 for every token (``e^x >= 1 + x``) and unbiased, like the plain
    ``logp - logp_ref`` (k1), whose per-sample values are negative whenever the reference likes the
    sampled token more than the actor does."""
    log_r = (ref_logprobs - logprobs).float()
    return torch.expm1(log_r) - log_r


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    The episode ends after the last masked token, so the value after it is 0. Returns
    ``(advantages, returns)`` with ``returns = advantages + values`` (the value-loss target).
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # positions past the end carry nothing back
        running = running * m
        advantages[:, t] = running
        next_value = values[:, t] * m
    returns = advantages + values
    return advantages * mask, returns * mask


# --------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
    num_tokens: Optional[torch.Tensor | float] = None,
) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate; also returns the clip fraction and an approximate KL to the
    rollout policy (``0.5 * E[(log r)^2]``) for logging."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask, global_=True)
        approx_kl = masked_mean(0.5 * log_ratio * log_ratio, mask, global_=True)
    return loss, {"policy_clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float,
    num_tokens: Optional[torch.Tensor | float] = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: the new value may move at most ``value_clip`` away from the value
    seen at rollout time; the larger of the clipped and unclipped squared errors is taken."""
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(err, err_clipped), mask, num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), mask, global_=True)
    return loss, {"value_clipfrac": clipfrac}


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``logits`` (same leading shape), in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical given by ``logits``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------- normaliser


class RunningMeanStd:
    """Mean and variance of every score seen so far, merged batch by batch (Chan et al.'s
    parallel update), identical on every rank. Saved in checkpoints so a resumed run
    normalises exactly as the uninterrupted one would."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 0.0):
        self.mean, self.var, self.count = float(mean), float(var), float(count)

    def update(self, x: torch.Tensor) -> None:
        """Merge the scores of this (global) batch; ``x`` holds this rank's scores."""
        x = x.detach().double().flatten()
        stats = _dist_sum(torch.stack([x.sum(), (x * x).sum(), x.new_tensor(float(x.numel()))]))
        n = float(stats[2])
        if n == 0:
            return
        b_mean = float(stats[0]) / n
        b_var = max(float(stats[1]) / n - b_mean * b_mean, 0.0)
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta * delta * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def normalize(self, x: torch.Tensor, use_std: bool = True, eps: float = 1e-8) -> torch.Tensor:
        out = x - self.mean
        return out / (self.std + eps) if use_std else out

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def policy_update_enabled(step: int, value_warmup_steps: int) -> bool:
    """Report 3.2.2: the first ``value_warmup_steps`` steps (0-based) train only the critic."""
    return step >= value_warmup_steps


def clip_scores(scores: torch.Tensor, reward_clip: Optional[float]) -> torch.Tensor:
    """Optional symmetric clipping of (normalised) scores; ``None`` leaves them alone."""
    if reward_clip is None:
        return scores
    return scores.clamp(-reward_clip, reward_clip)
