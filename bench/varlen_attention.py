#!/usr/bin/env python
"""Packed (THD) attention kernels against the CPU reference on the same inputs (model/varlen.py).

One packed row of ``--seq`` tokens cut into ``--docs`` documents of random lengths; every kernel
available here (the one ``select_kernel`` picks first) runs forward and backward on it, and is
compared with the per-document reference computed in fp32 on the CPU from the same inputs:
max abs difference of the output and of the q/k/v gradients, and the time of forward + backward
against SDPA with the dense block-diagonal mask (the path packed SFT used before). A kernel
passes when its error is at most twice the dense-mask SDPA's at the same dtype (plus 1e-6): no
less accurate than torch's own attention. Exit status 1 when a kernel fails.

    python bench/varlen_attention.py                       # GPU: 8k tokens, 8 documents, bf16
    python bench/varlen_attention.py --cpu                 # tiny, fp32: checks the script itself
    python bench/varlen_attention.py --window 1024         # with a layer window

One line of output per kernel: ``varlen <kernel> ... OK|FAIL``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qwen.model import varlen  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inputs(args, device, dtype):
    g = torch.Generator().manual_seed(args.seed)
    cuts = torch.randperm(args.seq - 1, generator=g)[: args.docs - 1].add(1).sort().values.tolist()
    cu = torch.tensor([0, *cuts, args.seq], dtype=torch.int32)
    q = torch.randn(args.seq, args.heads, args.head_dim, generator=g)
    k, v = (torch.randn(args.seq, args.groups, args.head_dim, generator=g) for _ in range(2))
    grad = torch.randn(args.seq, args.heads, args.head_dim, generator=g)
    return cu, [x.to(dtype) for x in (q, k, v)], grad.to(dtype)


def run(kernel, qkv, cu, grad, scale, window, device, backward=True):
    """(output, q/k/v grads or None), all on the CPU in fp32."""
    leaves = [x.to(device).requires_grad_(backward) for x in qkv]
    out = varlen.run_kernel(kernel, *leaves, cu.to(device), scale, window)
    grads = None
    if backward:
        out.backward(grad.to(device))
        grads = [x.grad.float().cpu() for x in leaves]
    return out.detach().float().cpu(), grads


def timed(kernel, qkv, cu, grad, scale, window, device, iters, backward):
    leaves = [x.to(device).requires_grad_(backward) for x in qkv]
    cu, grad = cu.to(device), grad.to(device)

    def once():
        out = varlen.run_kernel(kernel, *leaves, cu, scale, window)
        if backward:
            out.backward(grad)
    once()  # warm-up (FlexAttention compiles here)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def max_err(got, want):
    out, grads = got
    errs = [(out - want[0]).abs().max().item()]
    if grads is not None:
        errs += [(g - w).abs().max().item() for g, w in zip(grads, want[1])]
    return max(errs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny fp32 run on the CPU")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=16, help="K/V heads (GQA when < --heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cpu:
        args.seq, args.docs, args.heads, args.groups, args.head_dim, args.dtype, args.iters = 96, 4, 4, 2, 16, "fp32", 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = DTYPES[args.dtype]
    cu, qkv, grad = inputs(args, device, dtype)
    scale = args.head_dim ** -0.5
    selected, why = varlen.select_kernel("sdpa", device.type, dtype, args.head_dim, 0.0,
                                         varlen.flash_attn_varlen_func is not None,
                                         varlen.flex_attention is not None)
    print(f"varlen: {device.type} {args.dtype} t={args.seq} docs={args.docs} heads={args.heads}/{args.groups} "
          f"head_dim={args.head_dim} window={args.window}; selected {selected} ({why})", flush=True)
    want = run("reference", [x.float() for x in qkv], cu, grad.float(), scale, args.window, torch.device("cpu"))
    dense_err = max_err(run("dense", qkv, cu, grad, scale, args.window, device), want)
    dense_ms = timed("dense", qkv, cu, grad, scale, args.window, device, args.iters, True)
    kernels = [selected] + [k for k in ("flash", "flex", "reference") if k != selected]
    failed = False
    for kernel in kernels:
        if kernel == "flash" and (varlen.flash_attn_varlen_func is None or device.type != "cuda"
                                  or dtype not in varlen.FLASH_DTYPES):
            continue
        if kernel == "flex" and varlen.flex_attention is None:
            continue
        backward = not (kernel == "flex" and device.type == "cpu")  # no FlexAttention backward on CPU
        err = max_err(run(kernel, qkv, cu, grad, scale, args.window, device, backward), want)
        ms = timed(kernel, qkv, cu, grad, scale, args.window, device, args.iters, backward)
        ok = err <= 2 * dense_err + 1e-6
        failed |= not ok
        print(f"varlen {kernel}{' (selected)' if kernel == selected else ''}: max_abs_diff={err:.3e} "
              f"(dense-mask SDPA {dense_err:.3e}) {'fwd+bwd' if backward else 'fwd'} {ms:.2f} ms "
              f"vs dense-mask SDPA fwd+bwd {dense_ms:.2f} ms ({dense_ms / ms:.2f}x) "
              f"{'OK' if ok else 'FAIL'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
