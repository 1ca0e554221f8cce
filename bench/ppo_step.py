#!/usr/bin/env python
"""PPO step time split (generation / scoring / training) and tokens/s, our rollout sampler
against transformers' ``generate`` on the same prompts, and the ZeRO-3 rollout before and after
the rework (per-token gather, one batch, full-prompt logits vs gathered once, micro-batched,
last-position logits), one run, CPU.

Inputs are made on the spot (tests/scripts/ppo_tiny.py): a tiny Qwen2 actor, a tiny reward model
trained for a few seconds, token-id prompts, a pretraining indexed dataset. The PPO part runs
``PPOTrainer`` with all four DeepSpeed engines (actor/critic ZeRO-2, reference/reward ZeRO-3).
The generation part samples the same batch (prompts_per_step x 2 rows, top-p 0.9, no stop token
so both run the full length) with our KV-cached loop and with ``model.generate(do_sample=True,
top_p=0.9)`` (also KV-cached) and prints the ratio of generated tokens per second.

The ZeRO-3 part builds a ZeRO-3 actor engine (a larger random Qwen2, ``--zero3-hidden``,
``--zero3-layers``) and times the old sampler (tests/scripts/legacy_rollout.py, the code before the
rework) against ``InProcessGenerator`` (all rows in one batch, and in ``--zero3-micro-batch``
micro-batches) on the same rows and seeds, checks they sample the same token ids, and prints the
tokens/s and the ratios. Run it on 2 gloo processes:

    torchrun --nproc-per-node 2 bench/ppo_step.py [--steps 6] [--prompts-per-step 8] [--max-new-tokens 32]
    python bench/ppo_step.py ...     # one process (the ZeRO-3 part then gathers from one rank)
    torchrun --nproc-per-node 2 bench/ppo_step.py --zero3-only   # only the ZeRO-3 rollout part
    torchrun --nproc-per-node 2 bench/ppo_step.py --zero3-only --profile 25   # + where it spends time
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
    ap.add_argument("--zero3-hidden", type=int, default=256, help="hidden size of the ZeRO-3 rollout's actor")
    ap.add_argument("--zero3-layers", type=int, default=4)
    ap.add_argument("--zero3-rows", type=int, default=8, help="rollout rows per rank")
    ap.add_argument("--zero3-micro-batch", type=int, default=4, help="generation micro-batch (new path)")
    ap.add_argument("--zero3-prompt-length", type=int, default=32)
    ap.add_argument("--zero3-vocab", type=int, default=8192)
    ap.add_argument("--zero3-only", action="store_true", help="only the ZeRO-3 rollout part")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the ZeRO-3 timings, cProfile one micro-batched rollout on rank 0 and "
                         "print its N most expensive functions (own time)")
    args = ap.parse_args()

    import ppo_tiny

    from megatron_qwen.config import build_config, parse_overrides
    from megatron_qwen.rlhf.deepspeed_config import init_distributed
    from megatron_qwen.rlhf.ppo.config import PPOTrainConfig
    from megatron_qwen.rlhf.ppo.rollout import generate
    from megatron_qwen.rlhf.ppo.trainer import PPOTrainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    init_distributed()
    import torch.distributed as dist

    rank = dist.get_rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    root = Path(tempfile.mkdtemp(prefix="ppo_bench_")) if rank == 0 else None
    root = Path(broadcast_object(str(root) if root else None))
    if args.zero3_only:
        zero3_rollout(args, root, best_of(args.repeat), say)
        return
    if rank == 0:
        ppo_tiny.make_all(root)
    dist.barrier()
    assets = {"actor": root / "actor", "rm": root / "rm", "prompts": root / "prompts.jsonl", "ptx": root / "ptx"}
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
    say(f"PPO step ({n} sequences, <= {args.max_new_tokens} new tokens, mean of {len(warm)} steps after the first):")
    for k in keys[:4]:
        say(f"  {k:24s} {mean[k]:8.3f} s  ({100 * mean[k] / mean['time/step']:.0f}% of the step)"
              if k != "time/step" else f"  {k:24s} {mean[k]:8.3f} s")
    say(f"  tokens/s (prompt+response, whole step) {mean['tokens_per_s']:.0f}; "
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

    best = best_of(args.repeat)
    ours_tps, hf_tps = best(ours), best(hf)
    say(f"rollout sampling, {n} rows x {args.max_new_tokens} tokens, top-p 0.9:")
    say(f"  ours (per-row seeded, ZeRO-3-safe loop)  {ours_tps:8.0f} tokens/s")
    say(f"  transformers generate                    {hf_tps:8.0f} tokens/s")
    say(f"  ratio ours / transformers                {ours_tps / hf_tps:8.2f}")
    zero3_rollout(args, root, best, say)


def best_of(repeat: int):
    """``fn() -> tokens`` timed ``repeat`` times: tokens per second of the fastest."""
    def best(fn):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            tokens = fn()
            times.append(time.perf_counter() - t)
        return tokens / min(times)
    return best


def broadcast_object(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def zero3_rollout(args, root: Path, best, say) -> None:
    """Tokens/s of a ZeRO-3 actor's rollout: the old sampler vs the in-process generator."""
    import ppo_tiny
    import torch.distributed as dist
    from legacy_rollout import legacy_generate

    from megatron_qwen.rlhf import hf_model
    from megatron_qwen.rlhf.deepspeed_config import init_train_engine, make_ds_config, zero3_construction
    from megatron_qwen.rlhf.ppo.generator import GenerationRequest, InProcessGenerator

    rank, world = dist.get_rank(), dist.get_world_size()
    actor_dir = root / "zero3_actor"
    if rank == 0:
        h = args.zero3_hidden
        ppo_tiny.make_actor(actor_dir, hidden_size=h, intermediate_size=4 * h,
                            num_hidden_layers=args.zero3_layers, num_attention_heads=max(1, h // 32),
                            num_key_value_heads=max(1, h // 64), vocab_size=args.zero3_vocab,
                            max_position_embeddings=args.zero3_prompt_length + args.max_new_tokens + 8)
    dist.barrier()
    ds = make_ds_config(micro_batch_size=1, global_batch_size=world, world_size=world, zero_stage=3)
    with zero3_construction(ds):
        model = hf_model.load_causal_lm(actor_dir)
    engine = init_train_engine(model, ds, lr=1e-6)
    rng = np.random.default_rng(rank)  # prompts of 1/2 to 1x --zero3-prompt-length tokens
    rows = [rng.integers(ppo_tiny.FIRST_PROMPT_TOKEN, ppo_tiny.VOCAB,
                         int(rng.integers(args.zero3_prompt_length // 2, args.zero3_prompt_length + 1))).tolist()
            for _ in range(args.zero3_rows)]
    seeds = [rank * args.zero3_rows + i for i in range(args.zero3_rows)]
    # no stop token: every row runs the full length on both paths
    request = GenerationRequest(prompts=rows, seeds=seeds, prompt_index=list(range(len(rows))),
                                max_new_tokens=args.max_new_tokens, stop_token_id=-1,
                                pad_token_id=ppo_tiny.PAD, top_p=0.9)
    samples = {}

    def old():
        samples["old"] = legacy_generate(engine.module, rows, seeds, max_new_tokens=args.max_new_tokens,
                                         stop_token_id=-1, pad_token_id=ppo_tiny.PAD, top_p=0.9)
        return int(samples["old"].response_mask.sum()) * world

    def new(micro):
        def run():
            generator = InProcessGenerator(engine, micro_batch_size=micro, gather_params=True)
            samples[micro] = generator.generate(request)
            return int(samples[micro].response_mask.sum()) * world
        return run

    old_tps, new_tps, micro_tps = best(old), best(new(None)), best(new(args.zero3_micro_batch))
    same = all(torch.equal(samples["old"].sequences, samples[m].sequences) for m in (None, args.zero3_micro_batch))
    same = all_ranks(same, engine.device)
    params = sum(p.ds_numel for p in engine.module.parameters())
    say(f"ZeRO-3 rollout, {world} rank(s) x {len(rows)} rows x {args.max_new_tokens} tokens, actor "
        f"{params / 1e6:.1f} M parameters (hidden {args.zero3_hidden}, {args.zero3_layers} layers, "
        f"vocab {args.zero3_vocab}), top-p 0.9:")
    say(f"  before (gather per forward, one batch, all logits)  {old_tps:8.0f} tokens/s (all ranks)")
    say(f"  after  (gathered once, one batch, last logits)      {new_tps:8.0f} tokens/s (all ranks)"
        f"   <- the default: micro-batch auto is all {len(rows)} rows without a GPU size")
    say(f"  after, in micro-batches of {args.zero3_micro_batch:<3d} rows                {micro_tps:8.0f} tokens/s (all ranks)"
        f"   <- as if the KV budget held {args.zero3_micro_batch} rows")
    say(f"  ratio after / before (one batch)                    {new_tps / old_tps:8.2f}")
    say(f"  ratio after / before (micro-batches)                {micro_tps / old_tps:8.2f}")
    say(f"  same token ids on every rank: {same}")
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        new(args.zero3_micro_batch)()
        profiler.disable()
        if rank == 0:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    if not same:
        raise SystemExit("ZeRO-3 rollout: the new path sampled other tokens than the old one")


def all_ranks(flag: bool, device) -> bool:
    from megatron_qwen.runtime.collectives import all_reduce_scalars

    return all_reduce_scalars([1.0 if flag else 0.0], device=device, op="min")[0] == 1.0


if __name__ == "__main__":
    main()
