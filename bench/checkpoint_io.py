#!/usr/bin/env python
"""Save time, load time and peak host memory of the trainer's checkpoints, per optimizer form.

One model (fp32, ``--hidden``/``--layers``/``--vocab``; the default is ~170M parameters, 0.68 GB)
on ``--nproc`` gloo processes, DP=nproc with the distributed optimizer, through
``training.checkpoint.save_checkpoint`` / ``load_checkpoint`` exactly as the trainer calls them:

    fully_reshardable  --dist-ckpt-optim-fully-reshardable: the optimizer gathered into model
                       space on DP rank 0 at each save (the form before #13)
    dp_reshardable     the default: each rank writes its own buffer shards, fully parallel
    dp_async           dp_reshardable with --async-save: "save" is the time the training loop is
                       blocked; "save+finalize" until the checkpoint is published

Per mode, after one unmeasured save (the first save of a process also starts megatron-core's
writer helpers): the slowest rank's save and load wall time, and each rank's peak resident set during
the save and during the load above its resident set just before (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``). Files are in the page cache (written just before): the
load times are those of a warm cache. Ratios are against fully_reshardable.

    python bench/checkpoint_io.py [--nproc 2] [--hidden 1024] [--layers 8] [--vocab 32000] [--out DIR]
    python bench/checkpoint_io.py --hidden 128 --layers 2 --vocab 2048     # smallest, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODES = {"fully_reshardable": ["--dist-ckpt-optim-fully-reshardable"], "dp_reshardable": [],
         "dp_async": ["--async-save"]}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset VmHWM to the current resident set (Linux >= 4.0); returns the resident set in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def worker(mode: str, args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_qwen.config import load_config
    from megatron_qwen.runtime import init_distributed
    from megatron_qwen.training import checkpoint as ckpt
    from megatron_qwen.training.config import PretrainConfig
    from megatron_qwen.training.loop import Trainer

    torch.set_num_threads(1)
    save_dir = f"{args.out}/{mode}"
    flags = ["--model.preset", "tiny_vocab", "--hidden-size", str(args.hidden), "--num-layers",
             str(args.layers), "--num-attention-heads", str(max(1, args.hidden // 128)),
             "--ffn-hidden-size", str(args.hidden * 11 // 4), "--vocab-size", str(args.vocab),
             "--micro-batch-size", "1", "--global-batch-size", str(args.nproc), "--train-iters", "1",
             "--use-distributed-optimizer", "--save", save_dir, "--data-path", "unused",
             *MODES[mode]]
    cfg = load_config(PretrainConfig, flags)
    init_distributed(cfg.parallel, seed=1)
    trainer = Trainer(cfg)
    trainer.optimizer.step()  # zero gradients: every Adam moment exists, as in a real run
    rank = dist.get_rank()
    params = sum(p.numel() for c in trainer.model for p in c.parameters())

    def save(iteration):
        ckpt.save_checkpoint(save_dir, iteration, trainer.model, trainer.optimizer, trainer.scheduler, 0, cfg)

    # the first save of a process also starts megatron-core's writer helpers: not measured
    save(1)
    ckpt.finalize_async_saves(blocking=True)
    rss = _reset_peak()
    save_s = _timed(lambda: save(2))
    save_peak = max(0, _status_kib("VmHWM") - rss)
    finalize_s = save_s + _timed(lambda: ckpt.finalize_async_saves(blocking=True))
    rss = _reset_peak()
    load_s = _timed(lambda: ckpt.load_checkpoint(save_dir, trainer.model, trainer.optimizer,
                                                 trainer.scheduler, cfg))
    load_peak = max(0, _status_kib("VmHWM") - rss)
    row = {"mode": mode, "rank": rank, "params": params, "save_s": save_s, "finalize_s": finalize_s,
           "load_s": load_s, "save_peak_mib": save_peak / 1024, "load_peak_mib": load_peak / 1024,
           "ckpt_mib": sum(f.stat().st_size for f in ckpt.iter_dir(save_dir, 2).rglob("*") if f.is_file()) / 2**20}
    Path(args.out, f"{mode}.{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", "--ranks", dest="nproc", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args)
        return 0
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="checkpoint_io.")
    args.out = args.out or tmp.name
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    rows = {}
    for mode in MODES:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", "--master-port", str(free_port()),
               str(Path(__file__).resolve()), "--worker", mode, "--ranks", str(args.nproc),
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
               "--out", args.out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            print(f"error: {mode} run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        rows[mode] = [json.loads(Path(args.out, f"{mode}.{r}.json").read_text()) for r in range(args.nproc)]
    first = rows["fully_reshardable"][0]
    print(f"{first['params'] / 1e6:.1f}M parameters (fp32, {first['params'] * 4 / 2**30:.2f} GiB), "
          f"{args.nproc} gloo processes, DP={args.nproc}, distributed optimizer, checkpoint {first['ckpt_mib']:.0f} MiB")
    print("| mode | save s | save+finalize s | load s | save peak MiB/rank | load peak MiB/rank |")
    print("|---|---|---|---|---|---|")

    def agg(mode):
        rs = rows[mode]
        return {"save": max(r["save_s"] for r in rs), "fin": max(r["finalize_s"] for r in rs),
                "load": max(r["load_s"] for r in rs), "speak": [r["save_peak_mib"] for r in rs],
                "lpeak": [r["load_peak_mib"] for r in rs]}

    base = agg("fully_reshardable")
    for mode in MODES:
        a = agg(mode)
        print(f"| {mode} | {a['save']:.2f} ({base['save'] / a['save']:.1f}x) | {a['fin']:.2f} | "
              f"{a['load']:.2f} ({base['load'] / a['load']:.1f}x) | "
              f"{' / '.join(f'{m:.0f}' for m in a['speak'])} | {' / '.join(f'{m:.0f}' for m in a['lpeak'])} |")
    print("(x: fully_reshardable's time over this mode's; peaks above the resident set before the call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
