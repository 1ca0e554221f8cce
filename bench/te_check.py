#!/usr/bin/env python
"""Transformer Engine spec vs local spec: the same weights, the same batch, the same loss.

The local model's weights are saved as a dist checkpoint and loaded into the TE model through
the one TE <-> local mapping (checkpoint/te_layout.py), so this also runs the real TE load of a
local checkpoint. Prints one line ``te_check: PASS|FAIL|SKIP ...``; exit 0 on PASS or SKIP
(no GPU, or Transformer Engine does not import), 1 on FAIL. About 1 minute on one GPU.

    torchrun --nproc-per-node=1 bench/te_check.py [--seq 512] [--tolerance 0.01]
"""

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=512, help="tokens per sample")
    p.add_argument("--tolerance", type=float, default=0.01, help="largest relative loss difference (bf16)")
    args = p.parse_args()
    import torch

    from megatron_qwen.model.layer_spec import te_importable

    if not torch.cuda.is_available():
        print("te_check: SKIP no GPU")
        return 0
    if not te_importable():
        print("te_check: SKIP transformer_engine does not import")
        return 0
    from megatron.core import dist_checkpointing

    from megatron_qwen.checkpoint.mcore_io import load_model_weights
    from megatron_qwen.config import ParallelConfig, load_model_config
    from megatron_qwen.model import build_model
    from megatron_qwen.runtime import destroy, init_distributed

    init_distributed(ParallelConfig(), seed=1, bf16=True)
    cfg = load_model_config("tiny_vocab", num_layers=4, hidden_size=512, num_attention_heads=8,
                            ffn_hidden_size=1376, seq_length=args.seq, max_position_embeddings=args.seq)
    models = {}
    for impl in ("local", "transformer_engine"):
        (models[impl],) = build_model(dataclasses.replace(cfg, transformer_impl=impl), ParallelConfig(),
                                      params_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        dist_checkpointing.save({"model": models["local"].sharded_state_dict()}, tmp)
        load_model_weights([models["transformer_engine"]], tmp)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, args.seq), device="cuda")
    positions = torch.arange(args.seq, device="cuda")[None]
    losses = {}
    for impl, model in models.items():
        model.eval()
        with torch.no_grad():
            losses[impl] = model(tokens, positions, None, labels=tokens.roll(-1, 1)).float().mean().item()
    rel = abs(losses["transformer_engine"] - losses["local"]) / abs(losses["local"])
    ok = rel <= args.tolerance
    print(f"te_check: {'PASS' if ok else 'FAIL'} loss local {losses['local']:.5f}, TE "
          f"{losses['transformer_engine']:.5f}, relative difference {rel:.2e} (tolerance {args.tolerance})")
    destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
