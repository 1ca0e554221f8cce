#!/usr/bin/env python
"""PPO step time split (generation / scoring / training) and tokens/s, plus our rollout sampler
against transformers' ``generate`` on the same prompts, one run, one process, CPU.

Inputs are made on the spot (tests/scripts/ppo_tiny.py): a tiny Qwen2 actor, a tiny reward model
trained for a few seconds, token-id prompts, a pretraining indexed dataset. The PPO part runs
``PPOTrainer`` with all four DeepSpeed engines (actor/critic ZeRO-2, reference/reward ZeRO-3).
The generation part samples the same batch (prompts_per_step x 2 rows, top-p 0.9, no stop token
so both run the full length) with our KV-cached loop and with ``model.generate(do_sample=True,
top_p=0.9)`` (also KV-cached) and prints the ratio of generated tokens per second.

    python bench/ppo_step.py [--steps 6] [--prompts-per-step 8] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="generation timing repeats (best is kept)")
    args = ap.parse_args()

    import ppo_tiny

    from megatron_qwen.config import build_config, parse_overrides
    from megatron_qwen.rlhf.deepspeed_config import init_distributed
    from megatron_qwen.rlhf.ppo.config import PPOTrainConfig
    from megatron_qwen.rlhf.ppo.rollout import generate
    from megatron_qwen.rlhf.ppo.trainer import PPOTrainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    init_distributed()
    root = Path(tempfile.mkdtemp(prefix="ppo_bench_"))
    assets = ppo_tiny.make_all(root)
    n = args.prompts_per_step * 2
    cli = ppo_tiny.recipe_args(assets, root, train_iters=args.steps, prompts_per_step=args.prompts_per_step,
                               max_new_tokens=args.max_new_tokens, mini_batch_size=n // 2,
                               value_warmup_steps=0, metrics_jsonl=None)
    cfg = build_config(PPOTrainConfig, {}, parse_overrides(PPOTrainConfig, cli))
    trainer = PPOTrainer(cfg)
    history = [trainer.train_step() for _ in range(args.steps)]
    warm = history[1:] or history  # step 1 includes one-off allocations
    keys = ("time/generate", "time/score", "time/train", "time/step", "tokens_per_s", "generated_tokens_per_s")
    mean = {k: float(np.mean([h[k] for h in warm])) for k in keys}
    print(f"PPO step ({n} sequences, <= {args.max_new_tokens} new tokens, mean of {len(warm)} steps after the first):")
    for k in keys[:4]:
        print(f"  {k:24s} {mean[k]:8.3f} s  ({100 * mean[k] / mean['time/step']:.0f}% of the step)"
              if k != "time/step" else f"  {k:24s} {mean[k]:8.3f} s")
    print(f"  tokens/s (prompt+response, whole step) {mean['tokens_per_s']:.0f}; "
          f"generated tokens/s {mean['generated_tokens_per_s']:.0f}")

    # ---- our sampler vs transformers' generate on the same rows --------------------------
    model = trainer.engines.actor.module.eval()
    rows = [trainer.prompts[i % len(trainer.prompts)] for i in range(n)]
    width = max(map(len, rows))
    ids = torch.tensor([[ppo_tiny.PAD] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()

    def ours():
        out = generate(model, rows, list(range(n)), max_new_tokens=args.max_new_tokens, stop_token_id=-1,
                       pad_token_id=ppo_tiny.PAD, top_p=0.9)
        return int(out.response_mask.sum())

    def hf():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.9, top_k=0,
                                 max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                 pad_token_id=ppo_tiny.PAD)
        return int(out.shape[0] * (out.shape[1] - width))

    def best(fn):
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            tokens = fn()
            times.append(time.perf_counter() - t)
        return tokens / min(times)

    ours_tps, hf_tps = best(ours), best(hf)
    print(f"rollout sampling, {n} rows x {args.max_new_tokens} tokens, top-p 0.9:")
    print(f"  ours (per-row seeded, ZeRO-3-safe loop)  {ours_tps:8.0f} tokens/s")
    print(f"  transformers generate                    {hf_tps:8.0f} tokens/s")
    print(f"  ratio ours / transformers                {ours_tps / hf_tps:8.2f}")


if __name__ == "__main__":
    main()
