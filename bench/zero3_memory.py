#!/usr/bin/env python
"""Peak host memory per rank of ZeRO-3 engines, CPU, gloo: built whole vs partitioned at
construction (``deepspeed_config.zero3_construction``), and DeepSpeed's reduce bucket vs one
sized to a partition (``deepspeed_config.zero3_buffer_sizes``).

A random Qwen2 of a few hundred MB (``--hidden``/``--layers``/``--vocab``, saved in bf16 like
Qwen's checkpoints, loaded in fp32) is written to a temporary directory, then one
``torchrun --nproc-per-node N`` run per mode builds, on every rank, PPO's reward engine
(``load_with_head`` + ``init_inference_engine``: no optimizer), then the reward-model trainer's
engine (``init_train_engine``) and runs one training step:

    full         models built whole on every rank, partitioned by ``deepspeed.initialize``, with
                 DeepSpeed's 5e8-element reduce bucket (what the trainers did first)
    partitioned  built under ``HfDeepSpeedConfig`` / ``zero.Init``, DeepSpeed's reduce bucket
    sized        built partitioned, reduce bucket of at most one partition (what they do now)

Each rank reports its resident-set peak (``getrusage(RUSAGE_SELF).ru_maxrss``: every page the
process touched, including the safetensors file pages it mapped) minus the one after imports and
process-group start, after the reward engine and after the training step; the tracked tensor
peak (``memory_plan.measure.PeakAllocations``: allocations, touched or not, as a GPU would hold
them) of the training engine's construction and step, and its largest single tensor; and its
share of the parameters' elements. ``--nproc 1,2,4`` sweeps the world size (``--modes sized``
for the trainers' own construction only): per-rank state should fall as 1/world.

    python bench/zero3_memory.py [--nproc 2 | --nproc 1,2,4] [--modes full,partitioned,sized]
                                 [--hidden 1024] [--layers 12] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("full", "partitioned", "sized")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(mode: str, model_dir: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_qwen.memory_plan.measure import PeakAllocations, track_cpu_allocations
    from megatron_qwen.rlhf import hf_model
    from megatron_qwen.rlhf.deepspeed_config import (DEFAULT_REDUCE_BUCKET, init_distributed,
                                                     init_inference_engine, init_train_engine,
                                                     make_ds_config, zero3_construction)

    torch.set_num_threads(1)
    init_distributed()
    import deepspeed.runtime.zero.stage3  # noqa: F401  (imports before the baseline)
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    rank, world = dist.get_rank(), dist.get_world_size()
    track_cpu_allocations()  # the tracked block may free tensors built before it
    start = peak_rss_mib()

    def config(train: bool) -> dict:
        ds = make_ds_config(micro_batch_size=1, global_batch_size=world, world_size=world, zero_stage=3,
                            train=train)
        if mode != "sized":  # DeepSpeed's own reduce bucket, as before
            ds["zero_optimization"]["reduce_bucket_size"] = DEFAULT_REDUCE_BUCKET
        return ds

    def build(ds):
        if mode == "full":
            return hf_model.load_with_head(model_dir)
        with zero3_construction(ds):
            return hf_model.load_with_head(model_dir)

    # the reward engine (inference), then the reward-model trainer's engine and one step
    ds = config(train=False)
    reward = init_inference_engine(build(ds), ds)
    after_inference = peak_rss_mib()
    ds = config(train=True)
    model = build(ds)
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(rank))
    with PeakAllocations() as tracked:
        engine = init_train_engine(model, ds, lr=1e-5)
        engine.train()
        loss = engine(ids).float().mean()
        engine.backward(loss)
        engine.step()
    params = list(engine.module.parameters()) + list(reward.module.parameters())
    local = sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params)
    result = {"mode": mode, "rank": rank, "world": world, "start_mib": start,
              "inference_mib": after_inference, "peak_mib": peak_rss_mib(),
              "tracked_mib": tracked.peak / 2**20, "largest_mib": tracked.largest / 2**20,
              "local_share": local}
    (Path(out_dir) / f"{mode}_world{world}_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", default="2", help="ranks per run, or a comma list for a world-size sweep")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--checkpoint-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="dtype of the saved weights (Qwen's HF checkpoints are bf16; the engines load fp32)")
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "MODEL_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    worlds = [int(n) for n in args.nproc.split(",")]
    modes = args.modes.split(",")
    if not worlds or min(worlds) < 1 or not set(modes) <= set(MODES):
        sys.exit(f"--nproc {args.nproc!r} / --modes {args.modes!r}: ranks >= 1 and modes from {', '.join(MODES)}")
    root = Path(tempfile.mkdtemp(prefix="zero3_memory_"))
    h = args.hidden
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=h, intermediate_size=h * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, h // 64),
                         num_key_value_heads=max(1, h // 256), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, args.checkpoint_dtype))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(root / "model"), safe_serialization=True)
    del model
    print(f"model: {n_params / 1e6:.0f} M parameters, saved in {args.checkpoint_dtype}, {n_params * 4 / 2**20:.0f} MiB "
          f"in fp32 (hidden {h}, {args.layers} layers, vocab {args.vocab}); gloo ranks {args.nproc}, ZeRO-3",
          flush=True)
    rows = []
    for world in worlds:
        for mode in modes:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                   "--standalone", __file__, "--worker", mode, str(root / "model"), str(root)]
            env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{mode} run on {world} ranks failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            rows += [json.loads(f.read_text()) for f in sorted(root.glob(f"{mode}_world{world}_rank*.json"))]
    print(f"{'construction':12s} {'world':>5s} {'rank':>4s} {'reward engine':>13s} {'+ RM engine, 1 step':>19s} "
          f"{'tracked peak':>12s} {'largest tensor':>14s} {'param share':>11s}")
    print(f"{'':12s} {'':5s} {'':4s} {'RSS - start':>13s} {'RSS - start':>19s} {'(train) MiB':>12s} {'MiB':>14s}")
    for r in sorted(rows, key=lambda r: (MODES.index(r["mode"]), r["world"], r["rank"])):
        print(f"{r['mode']:12s} {r['world']:5d} {r['rank']:4d} {r['inference_mib'] - r['start_mib']:13.0f} "
              f"{r['peak_mib'] - r['start_mib']:19.0f} {r['tracked_mib']:12.0f} {r['largest_mib']:14.0f} "
              f"{r['local_share']:11.3f}")
    if len(worlds) > 1:
        by_world = {w: max(r["tracked_mib"] for r in rows if r["world"] == w and r["mode"] == modes[-1])
                    for w in worlds}
        base = min(worlds)
        print(f"\n{modes[-1]}: tracked peak per rank, largest rank, relative to {base} rank(s) "
              "(1/world scaling would give base/world):")
        for w in worlds:
            print(f"  world {w}: {by_world[w]:.0f} MiB, x{by_world[w] / by_world[base]:.3f} "
                  f"(1/world: x{base / w:.3f})")


if __name__ == "__main__":
    main()
