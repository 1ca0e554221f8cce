#!/usr/bin/env python
"""Held-out numbers of the demo's models (Hugging Face directories), as one JSON file.

    python examples/demo_eval.py --raw demo_out/raw --out demo_out/eval/heldout.json \
        --model sft=demo_out/hf/sft:plain,assistant,pairs,reward \
        --model rm=demo_out/hf/sft:pairs --reward-model demo_out/hf/rm [--samples 8 --seed 1]

Tasks (after the model directory):
  plain      perplexity on held-out documents (raw/heldout_text.jsonl, never trained on): their
             first two 128-token windows
  assistant  mean loss of the assistant tokens of held-out conversations (raw/sft_test.jsonl)
  reward     mean arithmetic reward (megatron_qwen/rlhf/ppo/rule_reward.py; --format-credit as
             PPO's ppo.arithmetic_format_credit) on the held-out prompts (raw/prompts_test.jsonl),
             --samples per prompt from fixed seeds
  pairs      share of held-out preference pairs (raw/pairs_test.jsonl) scored chosen > rejected:
             by --reward-model for the model named rm, else by the model's own likelihood of
             the answer (the preference the SFT model already has)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WINDOW = 128
WINDOWS_PER_DOC = 2  # the first 256 tokens of each held-out document: enough, and quick on CPU


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def nll_sum(model, ids: list, mask: list) -> tuple[float, float]:
    """Sum of -log p over the positions whose *target* has mask 1, and their count."""
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    target = x[0, 1:]
    m = torch.tensor(mask[1:], dtype=torch.float32)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    return float((nll * m).sum()), float(m.sum())


@torch.no_grad()
def plain_ppl(model, tokenizer, docs: list) -> float:
    total = count = 0.0
    for d in docs:
        ids = tokenizer.encode(d["text"]) + [tokenizer.eod_id]
        for s in range(0, min(max(1, len(ids) - 1), WINDOWS_PER_DOC * WINDOW), WINDOW):
            window = ids[s:s + WINDOW + 1]
            if len(window) < 2:
                continue
            n, c = nll_sum(model, window, [1] * len(window))
            total, count = total + n, count + c
    return math.exp(total / count)


@torch.no_grad()
def assistant_loss(model, tokenizer, conversations: list) -> float:
    from megatron_qwen.tokenizer import render_chatml

    total = count = 0.0
    for c in conversations:
        r = render_chatml(c["messages"], tokenizer)
        n, k = nll_sum(model, r.ids, r.loss_mask)
        total, count = total + n, count + k
    return total / count


@torch.no_grad()
def pair_accuracy(tokenizer, pairs: list, reward_model=None, lm=None) -> float:
    from megatron_qwen.tokenizer import render_chatml

    right = 0
    for p in pairs:
        scores = []
        for answer in (p["chosen"], p["rejected"]):
            r = render_chatml(p["prompt"] + [{"role": "assistant", "content": answer}], tokenizer)
            if reward_model is not None:
                x = torch.tensor([r.ids])
                scores.append(float(reward_model.reward(x, torch.ones_like(x))))
            else:
                scores.append(-nll_sum(lm, r.ids, r.loss_mask)[0])
        right += scores[0] > scores[1]
    return right / len(pairs)


TASKS = ("plain", "assistant", "pairs", "reward")


def parse_model(text: str) -> tuple:
    """NAME=DIR:task,task -> (name, dir, [tasks])."""
    name, sep, rest = text.partition("=")
    path, sep2, tasks = rest.rpartition(":")
    wanted = tasks.split(",") if sep2 else []
    bad = [t for t in wanted if t not in TASKS]
    if not sep or not sep2 or not name or not path or bad:
        raise argparse.ArgumentTypeError(f"--model {text!r}: expected NAME=DIR:TASK[,TASK] with tasks from "
                                         f"{', '.join(TASKS)}")
    return name, path, wanted


def evaluate(path: str, tasks: list, raw: Path, tokenizer, samples: int, seed: int, max_new_tokens: int,
             reward_model: str = None, format_credit: float = 0.0) -> dict:
    from megatron_qwen.rlhf import hf_model

    torch.manual_seed(0)
    model = hf_model.load_causal_lm(path).eval()
    out: dict = {"model": str(path)}
    if "plain" in tasks:
        out["plain_ppl"] = plain_ppl(model, tokenizer, read_jsonl(raw / "heldout_text.jsonl"))
    if "assistant" in tasks:
        out["assistant_loss"] = assistant_loss(model, tokenizer, read_jsonl(raw / "sft_test.jsonl"))
    if "reward" in tasks:
        from megatron_qwen.rlhf.ppo.prompts import load_prompts
        from megatron_qwen.rlhf.ppo.rule_reward import heldout_reward

        prompts, _ = load_prompts(raw / "prompts_test.jsonl", tokenizer)
        out["reward"] = heldout_reward(model, tokenizer, prompts, samples, seed, max_new_tokens=max_new_tokens,
                                       format_credit=format_credit)
    if "pairs" in tasks:
        rm = hf_model.load_with_head(reward_model, require_head=True).eval() if reward_model else None
        out["pair_accuracy"] = pair_accuracy(tokenizer, read_jsonl(raw / "pairs_test.jsonl"), reward_model=rm, lm=model)
        if reward_model:
            out["reward_model"] = str(reward_model)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=parse_model, action="append", required=True,
                   help="NAME=DIR:TASKS, a Hugging Face model directory and what to measure on it (repeatable)")
    p.add_argument("--raw", type=Path, required=True, help="the demo's raw data directory (held-out sets)")
    p.add_argument("--out", type=Path, required=True, help="write {NAME: numbers} here as JSON")
    p.add_argument("--samples", type=int, default=8, help="samples per held-out prompt for the reward task")
    p.add_argument("--seed", type=int, default=1, help="sampling seed for the reward task")
    p.add_argument("--max-new-tokens", type=int, default=8, help="response budget for the reward task")
    p.add_argument("--format-credit", type=float, default=0.0,
                   help="reward task: the score of a wrong answer that starts with a number (PPO's "
                        "ppo.arithmetic_format_credit)")
    p.add_argument("--reward-model", help="reward-model export that scores the pairs of the model named rm")
    args = p.parse_args(argv)

    from megatron_qwen.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    out = {}
    for name, path, tasks in args.model:
        out[name] = evaluate(path, tasks, args.raw, tokenizer, args.samples, args.seed, args.max_new_tokens,
                             reward_model=args.reward_model if name == "rm" else None,
                             format_credit=args.format_credit)
        print(f"{name}: " + json.dumps(out[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)
    return out


if __name__ == "__main__":
    main()
