#!/usr/bin/env python
"""Training throughput and MFU of our trainer against a peer, in one run, at the same shape.

  ours  megatron_qwen's Trainer (training/loop.py): the megatron-core GPTModel of model/builder.py,
        Float16Module + megatron-core DDP, the recipe's optimizer (distributed optimizer, fp32 master
        weights, AdamW, clipping), one ``train_step``: megatron-core's schedule, NaN guard, step.
  peer  what users of HF trainers get: transformers' Qwen2ForCausalLM built from the same model
        config (attn_implementation="sdpa", bf16 weights on GPU), torch.optim.AdamW (fused on CUDA,
        the Trainer's default "adamw_torch_fused") with the recipe's LR/betas/eps/weight decay,
        gradient accumulation over the same micro-batches and clip_grad_norm_.
Same synthetic tokens, same micro-batches per step; the two run one after the other on one device.
On CPU both compute in fp32 (a CPU run of the trainer drops --bf16), so the peer does too.

Printed: median step time, tokens/s, TFLOP/s per GPU and MFU with Megatron-LM's FLOPs
(training/metrics.py: model FLOPs, no recompute), and ours/peer. Per layer, without the output
head: each side also runs at --diff-layers layers; one layer's time is the difference of the two
median step times over the difference of the layer counts (embedding, head, loss and fixed per-step
costs cancel; the layers' share of the optimizer step stays in), and its FLOPs are one layer's.
The last line (the GPU check's table row) is the summary. Peak: the device table in metrics.py or
--peak-tflops; MFU is n/a on CPU without it. docs/performance.md says more.

    python bench/mfu.py                    GPU: Qwen-1.8B, seq 2048, 4 micro-batches of 4 per step
    python bench/mfu.py --model qwen_7b --layers 8 --micro-batch-size 2
    python bench/mfu.py                    CPU: the tiny preset at seq 128, a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_qwen.config import ConfigError, build_config  # noqa: E402
from megatron_qwen.training import metrics  # noqa: E402
from megatron_qwen.training.config import PretrainConfig  # noqa: E402

# a model preset's own pretraining recipe: its optimizer, precision and attention backend
RECIPES = {"qwen_1p8b": "pretrain_1p8b.yaml", "qwen_7b": "pretrain_7b.yaml",
           "qwen_14b": "pretrain_14b.yaml", "tiny": "pretrain_tiny.yaml"}
# what a recipe for another preset still decides (its vocabulary padding, say, does not apply)
RECIPE_MODEL_KEYS = ("attention_backend", "recompute_granularity")


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


@dataclass
class Run:
    """One side at one layer count."""

    layers: int
    step_s: list = field(default_factory=list)  # per timed step
    base_mem_gib: Optional[float] = None  # allocated before it started
    peak_mem_gib: Optional[float] = None  # its own peak, above that
    loss: Optional[float] = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


@dataclass
class Side:
    name: str
    setup: str = ""
    runs: dict = field(default_factory=dict)  # layers -> Run
    skipped: str = ""  # why this side did not run
    failed: str = ""  # what went wrong


def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**30 if on_gpu() else None


def allocated_gib() -> Optional[float]:
    return torch.cuda.memory_allocated() / 2**30 if on_gpu() else None


def time_steps(step: Callable[[], Optional[float]], warmup: int, steps: int, run: Run) -> None:
    """Warm-up steps, then ``steps`` timed ones, each closed by a device sync. Peak memory is
    counted above what was allocated before the run (``free_memory`` resets the peak)."""
    for _ in range(warmup):
        step()
    sync()
    for _ in range(steps):
        t0 = time.perf_counter()
        run.loss = step()
        sync()
        run.step_s.append(time.perf_counter() - t0)
    run.peak_mem_gib = None if run.base_mem_gib is None else peak_memory_gib() - run.base_mem_gib


# --------------------------------------------------------------------------- configuration


def bench_config(args, layers: int) -> PretrainConfig:
    """The recipe, at this shape, on one device, on synthetic data, with nothing written."""
    path = Path(args.recipe)
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--recipe {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"--recipe {path}: expected a mapping of groups")
    if (recipe.get("model") or {}).get("preset") != args.model:  # another model's shape fields do not apply
        recipe["model"] = {k: v for k, v in (recipe.get("model") or {}).items() if k in RECIPE_MODEL_KEYS}
    model = {"preset": args.model, "num_layers": layers, "seq_length": args.seq_length, "window_sizes": None}
    if args.backend:
        model["attention_backend"] = args.backend
    if args.recompute is not None:
        model["recompute_granularity"] = None if args.recompute == "none" else args.recompute
    overrides = {
        "model": model,
        "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                     "virtual_pipeline_model_parallel_size": None, "sequence_parallel": False},
        "data": {"data_path": ["synthetic"], "num_workers": 0},
        "optim": {"bf16": on_gpu()},
        "checkpoint": {"save": None, "load": None, "pretrained_checkpoint": None},
        "logging": {"tensorboard_dir": None, "wandb_project": None, "metrics_file": None},
        "train": {"task": "pretrain", "micro_batch_size": args.micro_batch_size,
                  "global_batch_size": args.micro_batch_size * args.micro_batches,
                  "train_iters": args.warmup + args.steps, "eval_interval": None},
    }
    return build_config(PretrainConfig, recipe, overrides, source=str(path))


def tokens_per_step(args) -> int:
    return args.micro_batch_size * args.micro_batches * args.seq_length


def dataset(cfg, args) -> SyntheticTokens:
    return SyntheticTokens(cfg.model.vocab_size, args.seq_length,
                           args.micro_batch_size * args.micro_batches * (args.warmup + args.steps))


# --------------------------------------------------------------------------- ours


def has_flash_attn() -> bool:
    try:
        from flash_attn import flash_attn_func  # noqa: F401
    except ImportError:
        return False
    return True


def megatron_core_missing() -> str:
    try:
        import megatron.core  # noqa: F401
    except ImportError as exc:
        return f"megatron-core is not importable ({exc})"
    return ""


def run_ours(args, layers: int, side: Side) -> Run:
    from megatron_qwen.runtime import init_distributed
    from megatron_qwen.training.loop import Trainer

    cfg = bench_config(args, layers)
    if not torch.distributed.is_initialized():
        init_distributed(cfg.parallel, seed=cfg.train.seed, bf16=cfg.optim.bf16)
    free_memory()
    run = Run(layers, base_mem_gib=allocated_gib())
    trainer = Trainer(cfg)
    data = trainer._iterators(dataset(cfg, args), 0)
    side.setup = (f"megatron-core GPTModel, {'bf16' if trainer.use_bf16 else 'fp32'}"
                  f"{' + fp32 master weights' if trainer.use_bf16 else ''}, "
                  f"{'distributed ' if cfg.parallel.use_distributed_optimizer else ''}optimizer "
                  f"(AdamW, clip {cfg.optim.clip_grad}), attention {cfg.model.attention_backend}, "
                  f"recompute {cfg.model.recompute_granularity or 'none'}")
    time_steps(lambda: trainer.train_step(data).loss, args.warmup, args.steps, run)
    del trainer, data
    free_memory()
    return run


# --------------------------------------------------------------------------- peer


def run_peer(args, layers: int, side: Side) -> Run:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers import __version__ as transformers_version

    from megatron_qwen.checkpoint.mapping import hf_config_from_model

    cfg = bench_config(args, layers)
    m, o = cfg.model, cfg.optim
    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    hf = hf_config_from_model(m, "qwen2", vocab_rows=m.vocab_size_padded(1), dtype=dtype)
    for key in ("torch_dtype", "bos_token_id", "eos_token_id"):  # not used in training
        hf.pop(key, None)
    config = Qwen2Config(**{**hf, "attn_implementation": "sdpa", "use_cache": False})
    free_memory()
    run = Run(layers, base_mem_gib=allocated_gib())
    torch.manual_seed(cfg.train.seed)
    with dev:
        model = Qwen2ForCausalLM(config).to(dtype).train()
    full = m.recompute_granularity == "full"  # the nearest HF has: checkpoint every layer
    if full:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                            weight_decay=o.weight_decay, fused=fused)
    loader = torch.utils.data.DataLoader(dataset(cfg, args), batch_size=args.micro_batch_size,
                                         pin_memory=on_gpu())
    it = iter(loader)
    side.setup = (f"transformers {transformers_version} Qwen2ForCausalLM, {model.config._attn_implementation}, "
                  f"{str(dtype).replace('torch.', '')} weights, torch AdamW{' (fused)' if fused else ''}, "
                  f"clip {o.clip_grad}, recompute {'full (activation checkpointing)' if full else 'none'}")

    def step() -> float:
        total = 0.0
        for _ in range(args.micro_batches):
            batch = next(it)
            ids = batch["tokens"].to(dev, non_blocking=True)
            # transformers shifts the labels itself: the same targets as ours
            loss = model(input_ids=ids, labels=ids).loss / args.micro_batches
            loss.backward()
            total = total + loss.detach()
        if o.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total)

    time_steps(step, args.warmup, args.steps, run)
    del model, opt, loader, it
    free_memory()
    return run


# --------------------------------------------------------------------------- figures


def figures(m, args, side: Side, peak: Optional[float]) -> dict:
    """Whole-step and per-layer throughput of one side (None where it did not run)."""
    out = {"name": side.name, "setup": side.setup, "skipped": side.skipped, "failed": side.failed}
    full = side.runs.get(args.layers)
    if full is None:
        return out
    flops = metrics.flops_per_token(m, args.seq_length) * tokens_per_step(args)
    tflops = flops / full.median_s / 1e12
    out.update(layers=args.layers, step_s=full.median_s, steps_s=full.step_s, loss=full.loss,
               tokens_per_sec=tokens_per_step(args) / full.median_s, tflops_per_gpu=tflops,
               mfu=tflops / peak if peak else None, peak_mem_gib=full.peak_mem_gib)
    if m.recompute_granularity and side.name == "ours":  # hardware FLOPs: the recomputed forward too
        extra = metrics.recompute_flops_per_token(m, args.seq_length) * tokens_per_step(args)
        out["hfu"] = (flops + extra) / full.median_s / 1e12 / peak if peak else None
    fewer = side.runs.get(args.diff_layers)
    if fewer is not None:
        layer_s = (full.median_s - fewer.median_s) / (args.layers - args.diff_layers)
        out.update(diff_layers=args.diff_layers, diff_step_s=fewer.median_s, layer_s=layer_s,
                   rest_s=full.median_s - args.layers * layer_s)
        if layer_s > 0:
            layer_tflops = metrics.layer_flops_per_token(m, args.seq_length) * tokens_per_step(args) / layer_s / 1e12
            out.update(layer_tflops=layer_tflops, layer_mfu=layer_tflops / peak if peak else None)
    return out


def pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ratio(a: dict, b: dict, key: str) -> Optional[float]:
    return a[key] / b[key] if a.get(key) and b.get(key) else None


def times(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def report(m, args, sides: list, peak: Optional[float], peak_from: str) -> tuple:
    """The printed lines and the figures of both sides."""
    head_share = m.vocab_size_padded(1) * m.hidden_size / metrics.matmul_params(m)
    lines = [f"mfu | {args.model}, {args.layers} layers, {metrics.matmul_params(m) / 1e9:.3g}B matmul params "
             f"({100 * head_share:.0f}% in the {m.vocab_size_padded(1):,}-row head) | seq {args.seq_length} x "
             f"micro-batch {args.micro_batch_size} x {args.micro_batches} per step | "
             f"{torch.cuda.get_device_name() if on_gpu() else 'cpu'}, peak "
             f"{'n/a' if peak is None else f'{peak:g} TFLOP/s'} ({peak_from}) | {metrics.FLOPS_CONVENTION}, "
             f"median of {args.steps} steps after {args.warmup} warm-up"]
    res = [figures(m, args, s, peak) for s in sides]
    for r in res:
        if r["skipped"] or (r["failed"] and "step_s" not in r):
            lines.append(f"{r['name']} | {'skipped' if r['skipped'] else 'FAILED'}: {r['skipped'] or r['failed']}")
            continue
        mem = "" if r["peak_mem_gib"] is None else f", peak mem {r['peak_mem_gib']:.1f} GiB"
        hfu = f", HFU {pct(r['hfu'])} (with recompute)" if "hfu" in r else ""
        line = (f"{r['name']} | {r['setup']} | step {r['step_s']:.3f} s, tokens/s {r['tokens_per_sec']:,.0f}, "
                f"TFLOP/s/GPU {r['tflops_per_gpu']:.4g}, MFU {pct(r['mfu'])}{hfu}{mem}, loss {r['loss']:.3f}")
        if "layer_s" in r:
            line += (f" | per layer (step at {r['layers']} vs {r['diff_layers']} layers: {r['step_s']:.3f} vs "
                     f"{r['diff_step_s']:.3f} s): {1e3 * r['layer_s']:.1f} ms")
            line += (f", TFLOP/s {r['layer_tflops']:.4g}, MFU {pct(r['layer_mfu'])}" if "layer_tflops" in r
                     else " (not above the noise: rerun with more --steps)")
            line += f"; head + rest {1e3 * r['rest_s']:.1f} ms"
        if r["failed"]:
            line += f" | FAILED later: {r['failed']}"
        lines.append(line)
    ours, peer = res
    lines.append(f"mfu summary | {args.model} {args.layers} layers seq {args.seq_length} | "
                 f"ours MFU {pct(ours.get('mfu'))} (per layer {pct(ours.get('layer_mfu'))}) | "
                 f"peer MFU {pct(peer.get('mfu'))} (per layer {pct(peer.get('layer_mfu'))}) | "
                 f"ours/peer {times(ratio(ours, peer, 'tokens_per_sec'))} "
                 f"(per layer {times(ratio(peer, ours, 'layer_s'))})"
                 + (f" | ours skipped: {ours['skipped']}" if ours["skipped"] else ""))
    return lines, res


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    gpu = on_gpu()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen_1p8b" if gpu else "tiny",
                   help="model preset of megatron_qwen/configs/model (default: qwen_1p8b on GPU, tiny on CPU)")
    p.add_argument("--recipe", default=None,
                   help="recipe for the optimizer, precision, attention backend and recompute (default: the "
                        "preset's examples/pretrain_*.yaml, else pretrain_1p8b.yaml)")
    p.add_argument("--layers", type=int, default=None, help="truncate to this many layers (default: the preset's)")
    p.add_argument("--diff-layers", type=int, default=None,
                   help="the second layer count for the per-layer figure (default: half; 0: no per-layer figure)")
    p.add_argument("--seq-length", type=int, default=2048 if gpu else 128)
    p.add_argument("--micro-batch-size", type=int, default=4 if gpu else 2)
    p.add_argument("--micro-batches", type=int, default=4 if gpu else 1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=5 if gpu else 2, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2 if gpu else 1, help="untimed steps first")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default=None,
                   help="activation recompute (default: the recipe's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: from the GPU's name; none on CPU)")
    p.add_argument("--only", choices=("ours", "peer"), default=None, help="run one side only")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    args.backend = None  # main() sets it from the recipe and this machine
    from megatron_qwen.config import model_preset

    try:
        preset_layers = model_preset(args.model).get("num_layers")
    except ConfigError as exc:
        p.error(str(exc))
    args.layers = args.layers or preset_layers
    if args.diff_layers is None:
        args.diff_layers = args.layers // 2
    for name in ("layers", "seq_length", "micro_batch_size", "micro_batches", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not 0 <= args.diff_layers < args.layers:
        p.error(f"--diff-layers {args.diff_layers} must be in [0, --layers {args.layers})")
    if args.recipe is None:
        args.recipe = str(REPO / "examples" / RECIPES.get(args.model, "pretrain_1p8b.yaml"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        print("error: bench/mfu.py compares one device with a one-device peer: run one process (the trainer's "
              "own log line gives tokens/s and MFU for a multi-GPU job)", file=sys.stderr)
        return 2
    try:
        cfg = bench_config(args, args.layers)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # the recipe's backend where this machine has its kernel, else SDPA (which the peer uses too)
    wanted = cfg.model.attention_backend
    args.backend = wanted if wanted != "flash" or (on_gpu() and has_flash_attn()) else "sdpa"
    cfg = bench_config(args, args.layers)
    peak, peak_from = args.peak_tflops, "--peak-tflops"
    if peak is None:
        peak = metrics.peak_tflops()
        peak_from = "device table" if peak else ("no GPU" if not on_gpu() else "unknown GPU: give --peak-tflops")
    layer_counts = [args.layers] + ([args.diff_layers] if args.diff_layers else [])
    sides = [Side("ours"), Side("peer")]
    missing = megatron_core_missing()
    if args.only == "peer":
        sides[0].skipped = "--only peer"
    elif missing:
        sides[0].skipped = missing
    if args.only == "ours":
        sides[1].skipped = "--only ours"
    # the peer first: our Trainer's model stays reachable after a run (seen on CPU: gc does not
    # free it; the cause, inside megatron-core, is not pinned down), so its runs go last, the full
    # depth first; each run's peak memory is counted above what it found allocated
    for side, run in ((sides[1], run_peer), (sides[0], run_ours)):
        if side.skipped:
            continue
        for layers in layer_counts:
            try:
                side.runs[layers] = run(args, layers, side)
            except Exception as exc:  # noqa: BLE001 - reported in the table; the other side still runs
                side.failed = f"{layers} layers: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                free_memory()
                break
    lines, res = report(cfg.model, args, sides, peak, peak_from)
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "sides": res}, indent=1) + "\n")
    return 1 if any(s.failed for s in sides) else 0


if __name__ == "__main__":
    sys.exit(main())
