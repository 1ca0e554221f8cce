#!/usr/bin/env python
"""Training throughput and MFU of the trainer on report-size shapes, synthetic tokens.

GPU: Qwen-1.8B in full, and Qwen-7B / Qwen-14B with their real width but fewer layers so that
one 80 GB GPU holds them (per-layer throughput is what matters; MFU counts the layers run).
CPU: a smoke size (the `tiny` preset), MFU n/a. Prints tokens/s, TFLOP/s per GPU and MFU, with
the FLOPs formula of megatron_qwen/training/metrics.py: Megatron-LM's ``6 N + 6 L q s`` per token
(attention's score and value products halved for the causal mask, as Megatron-LM counts them).

    python bench/mfu.py [--models 1p8b,7b,14b] [--steps 10] [--warmup 3]
    torchrun --nproc-per-node 8 bench/mfu.py --models 7b --tp 2    (a full node)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_qwen.config import build_config  # noqa: E402
from megatron_qwen.training import metrics  # noqa: E402
from megatron_qwen.training.config import PretrainConfig  # noqa: E402

# name -> (preset, layers run on one GPU, micro-batch)
GPU_SHAPES = {"1p8b": ("qwen_1p8b", None, 4), "7b": ("qwen_7b", 8, 2), "14b": ("qwen_14b", 6, 1)}


class SyntheticTokens(torch.utils.data.Dataset):
    """Uniform random token ids: throughput does not depend on the text."""

    def __init__(self, vocab: int, seq: int, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq + 1), generator=g)
        self.pos = torch.arange(seq)
        self.mask = torch.ones(seq)

    def __len__(self):
        return self.data.shape[0]

    def __getitem__(self, i):
        x = self.data[i]
        return {"tokens": x[:-1], "labels": x[1:], "loss_mask": self.mask, "position_ids": self.pos}


def bench_one(name: str, args) -> dict:
    from megatron_qwen.runtime import init_distributed
    from megatron_qwen.training.loop import Trainer

    on_gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if on_gpu:
        preset, layers, mbs = GPU_SHAPES[name]
        seq = 2048
        model = {"preset": preset, "seq_length": seq, "padded_vocab_size": 151936}
        if layers:
            model["num_layers"] = layers
        try:
            import flash_attn  # noqa: F401
            model["attention_backend"] = "flash"
        except ImportError:
            model["attention_backend"] = "sdpa"
    else:
        name, seq, mbs = "tiny (CPU smoke)", 128, 2
        model = {"preset": "tiny", "seq_length": seq}
    dp = world // (args.tp * args.pp)
    gbs = mbs * dp * args.micro_batches
    cfg = build_config(PretrainConfig, {
        "model": model,
        "parallel": {"tensor_model_parallel_size": args.tp, "pipeline_model_parallel_size": args.pp,
                     "sequence_parallel": args.tp > 1, "use_distributed_optimizer": world > 1},
        "data": {"data_path": ["synthetic"], "num_workers": 0},
        "optim": {"bf16": on_gpu, "lr": 1e-4, "min_lr": 1e-5},
        "train": {"micro_batch_size": mbs, "global_batch_size": gbs,
                  "train_iters": args.warmup + args.steps},
    })
    init_distributed(cfg.parallel, seed=1234)
    trainer = Trainer(cfg)
    n = gbs * (args.warmup + args.steps)
    data = trainer._iterators(SyntheticTokens(cfg.model.vocab_size, seq, n), 0)
    for _ in range(args.warmup):
        trainer.train_step(data)
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(data)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = gbs * seq * args.steps
    result = metrics.throughput(cfg.model, tokens, seconds, world, metrics.peak_tflops())
    result.update(name=name, layers=cfg.model.num_layers, params_b=metrics.matmul_params(cfg.model) / 1e9,
                  seq=seq, global_batch=gbs, step_s=seconds / args.steps,
                  device=torch.cuda.get_device_name() if on_gpu else "cpu", world=world)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="1p8b,7b,14b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step per DP rank")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    args = p.parse_args()
    names = args.models.split(",") if torch.cuda.is_available() else ["cpu"]
    if not torch.cuda.is_available():
        args.steps, args.warmup, args.micro_batches = min(args.steps, 3), 1, 1
    for name in names:
        r = bench_one(name, args)
        if int(os.environ.get("RANK", "0")) == 0:
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"{r['name']:>16s} | {r['layers']} layers, {r['params_b']:.2f}B matmul params | seq {r['seq']} "
                  f"x batch {r['global_batch']} | {r['device']} x{r['world']} | step {r['step_s']:.3f} s | "
                  f"tokens/s {r['tokens_per_sec']:.0f} | TFLOP/s/GPU {r['tflops_per_gpu']:.2f} | MFU {mfu} "
                  f"({metrics.FLOPS_CONVENTION})",
                  flush=True)


if __name__ == "__main__":
    main()
