"""A rule-based PPO reward: is the answer to a short arithmetic question right? (``ppo.reward:
arithmetic``; the learned reward model is ``ppo.reward: model``).

In the spirit of the report's Math-Qwen, where correctness is checkable: the question is the last
``A op B`` (op one of + - *) in the prompt's text, e.g. "What is 3+4?", and a response scores 1.0
when the first integer it contains equals the result, else 0.0. A tiny model can learn this, so a
PPO run shows its effect on a held-out prompt set (``heldout_reward``) without a reward model's
noise in between.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

_QUESTION = re.compile(r"(-?\d+)\s*([+\-*×])\s*(-?\d+)")
_INTEGER = re.compile(r"-?\d+")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "×": lambda a, b: a * b}


def expected_answer(prompt_text: str) -> Optional[int]:
    """The value of the last ``A op B`` in ``prompt_text``; None when there is none."""
    found = _QUESTION.findall(prompt_text)
    if not found:
        return None
    a, op, b = found[-1]
    return _OPS[op](int(a), int(b))


def score_text(prompt_text: str, response_text: str) -> float:
    """1.0 if the response's first integer is the prompt's arithmetic result, else 0.0."""
    want = expected_answer(prompt_text)
    got = _INTEGER.search(response_text)
    return float(want is not None and got is not None and int(got.group()) == want)


class ArithmeticReward:
    """Scores token-id sequences: decodes the prompt and the response (up to the stop token)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        scores = []
        for row, mask in zip(sequences.tolist(), attention_mask.tolist()):
            prompt = [t for t, m in zip(row[:prompt_length], mask[:prompt_length]) if m]
            response = [t for t, m in zip(row[prompt_length:], mask[prompt_length:]) if m]
            scores.append(score_text(self.tokenizer.decode(prompt),
                                     self.tokenizer.decode(response, skip_special=True)))
        return torch.tensor(scores, dtype=torch.float32, device=sequences.device)


@torch.no_grad()
def heldout_reward(model, tokenizer, prompts: Sequence[Sequence[int]], samples_per_prompt: int, seed: int,
                   max_new_tokens: int = 8, top_p: float = 0.9, temperature: float = 1.0,
                   batch_size: int = 32) -> dict:
    """Mean arithmetic reward of ``model`` (a transformers causal LM) on ``prompts``, with
    ``samples_per_prompt`` samples each drawn from fixed seeds (the same for every model, so a
    before/after comparison differs only by the model). ``solved_share``: the share of prompts
    that most of their samples answer right; ``stderr``: the standard error of the mean over the
    prompts (samples of one prompt are not independent, prompts are)."""
    from megatron_qwen.rlhf.ppo.rollout import generate
    from megatron_qwen.rlhf.ppo.trainer import sample_seed

    score = ArithmeticReward(tokenizer)
    rows = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]
    total, per_prompt = 0.0, [0.0] * len(prompts)
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        out = generate(model, [list(prompts[i]) for i, _ in chunk],
                       [sample_seed(seed, 0, i * samples_per_prompt + j) for i, j in chunk],
                       max_new_tokens=max_new_tokens, stop_token_id=tokenizer.im_end_id,
                       pad_token_id=tokenizer.eod_id, top_p=top_p, temperature=temperature)
        for (i, _), r in zip(chunk, score(out.sequences, out.attention_mask, out.prompt_length).tolist()):
            total += r
            per_prompt[i] += r / samples_per_prompt
    mean = total / len(rows)
    spread = sum((p - mean) ** 2 for p in per_prompt) / max(1, len(prompts) - 1)
    return {"mean_reward": mean, "prompts": len(prompts), "samples_per_prompt": samples_per_prompt,
            "solved_share": sum(p > 0.5 for p in per_prompt) / len(prompts),
            "stderr": (spread / len(prompts)) ** 0.5}
