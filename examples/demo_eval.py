#!/usr/bin/env python
"""Held-out numbers of the demo's models (Hugging Face directories), as one JSON file.

    python examples/demo_eval.py --model demo_out/hf/sft --raw demo_out/raw --out eval.json \
        [--plain] [--assistant] [--reward --samples 8 --seed 1] [--pairs --reward-model demo_out/hf/rm]

--plain       perplexity on held-out documents (raw/heldout_text.jsonl, never trained on), in
              128-token windows
--assistant   mean loss of the assistant tokens of held-out conversations (raw/sft_test.jsonl)
--reward      mean arithmetic reward (megatron_qwen/rlhf/ppo/rule_reward.py) on the held-out
              prompts (raw/prompts_test.jsonl), --samples per prompt from fixed seeds
--pairs       share of held-out preference pairs (raw/pairs_test.jsonl) that --reward-model
              scores chosen > rejected; without --reward-model, the --model's own log-likelihood
              of the answer decides (the preference the SFT model already has)
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
        for s in range(0, max(1, len(ids) - 1), WINDOW):
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
        n, k = nll_sum(model, r.ids, r.mask)
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
                scores.append(-nll_sum(lm, r.ids, r.mask)[0])
        right += scores[0] > scores[1]
    return right / len(pairs)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face directory of the model to evaluate")
    p.add_argument("--raw", type=Path, required=True, help="the demo's raw data directory (held-out sets)")
    p.add_argument("--out", type=Path, required=True, help="write the numbers here as JSON")
    p.add_argument("--plain", action="store_true", help="perplexity on held-out documents")
    p.add_argument("--assistant", action="store_true", help="assistant-token loss on held-out conversations")
    p.add_argument("--reward", action="store_true", help="mean arithmetic reward on held-out prompts")
    p.add_argument("--samples", type=int, default=8, help="samples per held-out prompt for --reward")
    p.add_argument("--seed", type=int, default=1, help="sampling seed for --reward")
    p.add_argument("--max-new-tokens", type=int, default=8, help="response budget for --reward")
    p.add_argument("--pairs", action="store_true", help="pairwise accuracy on held-out preference pairs")
    p.add_argument("--reward-model", help="reward-model export to score --pairs with (else --model's likelihood)")
    args = p.parse_args(argv)

    from megatron_qwen.rlhf import hf_model
    from megatron_qwen.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(None)
    model = hf_model.load_causal_lm(args.model).eval()
    out: dict = {"model": str(args.model)}
    if args.plain:
        out["plain_ppl"] = plain_ppl(model, tokenizer, read_jsonl(args.raw / "heldout_text.jsonl"))
    if args.assistant:
        out["assistant_loss"] = assistant_loss(model, tokenizer, read_jsonl(args.raw / "sft_test.jsonl"))
    if args.reward:
        from megatron_qwen.rlhf.ppo.prompts import load_prompts
        from megatron_qwen.rlhf.ppo.rule_reward import heldout_reward

        prompts, _ = load_prompts(args.raw / "prompts_test.jsonl", tokenizer)
        out["reward"] = heldout_reward(model, tokenizer, prompts, args.samples, args.seed,
                                       max_new_tokens=args.max_new_tokens)
    if args.pairs:
        pairs = read_jsonl(args.raw / "pairs_test.jsonl")
        rm = hf_model.load_with_head(args.reward_model, require_head=True).eval() if args.reward_model else None
        out["pair_accuracy"] = pair_accuracy(tokenizer, pairs, reward_model=rm, lm=model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
