#!/usr/bin/env python
"""Planned vs measured peak memory over a larger matrix than the test's (CPU, gloo processes).

    python bench/plan_memory_check.py [--nproc 2] [--quick]

Runs tests/scripts/memory_plan_megatron.py (TP/PP/SP/distributed optimizer/recompute, tiny and
small models) and tests/scripts/memory_plan_deepspeed.py (ZeRO 0-3, gradient checkpointing) under
torchrun and prints one markdown row per case: planned, measured, ratio, and the ratio without
DeepSpeed's reduce bucket. On a GPU machine the same workers read torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dist import REPO, run_torchrun  # noqa: E402

MEGATRON = [
    ("tiny", {}, {"micro_batch_size": 2, "global_batch_size": 4}),
    ("small", {}, {"micro_batch_size": 2, "global_batch_size": 4}),
    ("small", {"tensor_model_parallel_size": 2, "sequence_parallel": True}, {"micro_batch_size": 2, "global_batch_size": 2}),
    ("small", {"tensor_model_parallel_size": 2}, {"micro_batch_size": 2, "global_batch_size": 2}),
    ("tiny", {"tensor_model_parallel_size": 2}, {"micro_batch_size": 2, "global_batch_size": 2}),
    ("small", {"pipeline_model_parallel_size": 2}, {"micro_batch_size": 2, "global_batch_size": 4}),
    ("small", {"pipeline_model_parallel_size": 2}, {"micro_batch_size": 1, "global_batch_size": 8}),
    ("tiny", {"use_distributed_optimizer": True}, {"micro_batch_size": 2, "global_batch_size": 4}),
    ("small", {"use_distributed_optimizer": True}, {"micro_batch_size": 4, "global_batch_size": 8}),
]
ZERO = ([{"model": "tiny", "zero_stage": 0, "micro": 2, "seq": 64, "checkpointing": False}]
        + [{"model": "small", "zero_stage": z, "micro": 2, "seq": 128, "checkpointing": c}
           for z in (0, 1, 2, 3) for c in (False, True)]
        + [{"model": "tiny", "zero_stage": 3, "micro": 2, "seq": 64, "checkpointing": True}])


def rows(out: str, label) -> list:
    lines = []
    for line in out.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            b = r.get("bucket", 0)
            lines.append(f"| {label(r)} | {r['planned'] / 2**20:.1f} | {r['measured'] / 2**20:.1f} | "
                         f"{r['planned'] / r['measured']:.3f} | {(r['planned'] - b) / (r['measured'] - b):.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="two cases of each (checks the script runs)")
    args = ap.parse_args()
    mg = [{"model": m, "parallel": p, "train": t} for m, p, t in MEGATRON]
    zero = ZERO
    if args.quick:
        mg, zero = mg[:2], zero[:2]
    print("| case | planned MiB | measured MiB | planned/measured | without the reduce bucket |")
    print("|---|---:|---:|---:|---:|")
    out = run_torchrun(REPO / "tests/scripts/memory_plan_megatron.py", json.dumps(mg), nproc=args.nproc)
    print("\n".join(rows(out, lambda r: f"megatron {r['model']} {r['parallel'] or 'DP'} {r['train']}")), flush=True)
    import torch

    env = {"HF_HUB_OFFLINE": "1"} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = run_torchrun(REPO / "tests/scripts/memory_plan_deepspeed.py", tmp, json.dumps(zero),
                           nproc=args.nproc, env=env)
    print("\n".join(rows(out, lambda r: f"ZeRO-{r['zero_stage']} {r['model']} micro {r['micro']} x {r['seq']}"
                         + (" ckpt" if r["checkpointing"] else ""))))


if __name__ == "__main__":
    main()
