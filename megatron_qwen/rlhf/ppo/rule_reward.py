"""A rule-based PPO reward: is the answer to a short arithmetic question right? (``ppo.reward:
arithmetic``; the learned reward model is ``ppo.reward: model``).

In the spirit of the report's Math-Qwen, where correctness is checkable: the question is the last
``A op B`` (op one of + - *) in the prompt's text, e.g. "What is 3+4?", and a response scores 1.0
when the first integer it contains equals the result, else 0.0, or ``format_credit`` when it at
least starts with an integer (``ppo.arithmetic_format_credit``: a model that does not yet answer
in the format gets a gradient towards it before it can be right). A tiny model can learn this, so a
PPO run shows its effect on a held-out prompt set (``heldout_reward``) without a reward model's
noise in between.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

_QUESTION = re.compile(r"(-?\d+)\s*([+\-*×])\s*(-?\d+)")
_INTEGER = re.compile(r"-?\d+")
_STARTS_WITH_INTEGER = re.compile(r"\s*-?\d")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "×": lambda a, b: a * b}


def expected_answer(prompt_text: str) -> Optional[int]:
    """The value of the last ``A op B`` in ``prompt_text``; None when there is none."""
    found = _QUESTION.findall(prompt_text)
    if not found:
        return None
    a, op, b = found[-1]
    return _OPS[op](int(a), int(b))


def score_text(prompt_text: str, response_text: str, format_credit: float = 0.0) -> float:
    """1.0 if the response's first integer is the prompt's arithmetic result; else
    ``format_credit`` if the response starts with an integer (an answer in the format), else 0.0."""
    want = expected_answer(prompt_text)
    if want is None:
        return 0.0
    got = _INTEGER.search(response_text)
    if got is not None and int(got.group()) == want:
        return 1.0
    return float(format_credit) if _STARTS_WITH_INTEGER.match(response_text) else 0.0


class ArithmeticReward:
    """Scores token-id sequences: decodes the prompt and the response (up to the stop token)."""

    def __init__(self, tokenizer, format_credit: float = 0.0):
        self.tokenizer = tokenizer
        self.format_credit = format_credit

    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        scores = []
        for row, mask in zip(sequences.tolist(), attention_mask.tolist()):
            prompt = [t for t, m in zip(row[:prompt_length], mask[:prompt_length]) if m]
            response = [t for t, m in zip(row[prompt_length:], mask[prompt_length:]) if m]
            scores.append(score_text(self.tokenizer.decode(prompt),
                                     self.tokenizer.decode(response, skip_special=True), self.format_credit))
        return torch.tensor(scores, dtype=torch.float32, device=sequences.device)


@torch.no_grad()
def heldout_reward(model, tokenizer, prompts: Sequence[Sequence[int]], samples_per_prompt: int, seed: int,
                   max_new_tokens: int = 8, top_p: float = 0.9, temperature: float = 1.0,
                   batch_size: int = 32, format_credit: float = 0.0) -> dict:
    """Mean arithmetic reward of ``model`` (a transformers causal LM) on ``prompts``, with
    ``samples_per_prompt`` samples each drawn from fixed seeds (the same for every model, so a
    before/after comparison differs only by the model). ``right_share``: the share of samples
    that answer right (format credit aside); ``in_format_share`` (with a format credit): those that score, right or starting with an integer;
    ``solved_share``: the share of prompts that most of their samples answer right; ``stderr``: the standard error of the mean over the
    prompts (samples of one prompt are not independent, prompts are)."""
    from megatron_qwen.rlhf.ppo.rollout import generate
    from megatron_qwen.rlhf.ppo.trainer import sample_seed

    score = ArithmeticReward(tokenizer, format_credit)
    rows = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]
    total, per_prompt, right = 0.0, [0.0] * len(prompts), [0.0] * len(prompts)
    in_format = 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        out = generate(model, [list(prompts[i]) for i, _ in chunk],
                       [sample_seed(seed, 0, i * samples_per_prompt + j) for i, j in chunk],
                       max_new_tokens=max_new_tokens, stop_token_id=tokenizer.im_end_id,
                       pad_token_id=tokenizer.eod_id, top_p=top_p, temperature=temperature)
        for (i, _), r in zip(chunk, score(out.sequences, out.attention_mask, out.prompt_length).tolist()):
            total += r
            per_prompt[i] += r / samples_per_prompt
            right[i] += (r == 1.0) / samples_per_prompt
            in_format += r > 0 if format_credit > 0 else 0
    mean = total / len(rows)
    spread = sum((p - mean) ** 2 for p in per_prompt) / max(1, len(prompts) - 1)
    return {"mean_reward": mean, "prompts": len(prompts), "samples_per_prompt": samples_per_prompt,
            "right_share": sum(right) / len(prompts), "solved_share": sum(p > 0.5 for p in right) / len(prompts),
            **({"format_credit": format_credit, "in_format_share": in_format / len(rows)} if format_credit > 0 else {}),
            "stderr": (spread / len(prompts)) ** 0.5}
