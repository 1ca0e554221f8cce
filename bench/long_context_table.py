#!/usr/bin/env python
"""Table 3 in small: train a tiny Qwen on CPU at a short context, then measure perplexity at 1x,
2x, 4x and 8x that context with plain RoPE, + dynamic NTK, + LogN, + layer-wise windows.

    python bench/long_context_table.py --out /tmp/lc_bench        # the recorded run: ~20 min on 2 cores

Corpus (``--corpus sources``): CPython's standard-library source files (~30 MB of real code with
English comments, shipped with Python), tokenized with the Qwen tokenizer and remapped to its
2,047 most frequent ids (+1 for the rest) so a 4-layer model trains in minutes on 2 cores. The
files at least 8L + 1 tokens long are split 90/10 into train and held-out; perplexity is on the
first L + 1 tokens of each held-out file. The trained model is saved as a megatron-core
torch_dist checkpoint with the held-out files as an indexed dataset, and the table is computed
by the same code as tools/eval_ppl.py (the exact command is printed); it is also written to
OUT/table.json. The peer is transformers' Qwen2ForCausalLM on the same weights
and samples: plain RoPE must match ours, and its own ``rope_scaling={"type": "dynamic"}`` (a
different NTK formula, see docs/long_context.md) is printed beside ours.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qwen.config import ModelConfig, ParallelConfig  # noqa: E402


CORPORA = ("sources", "docs")


def corpus(name: str, vocab: int, min_len: int, max_mb: float, holdout_every: int = 10):
    """(train stream, held-out docs) as remapped ids; the 0 id stands for every rarer token.

    ``sources``: CPython's standard-library source files (~30 MB of code with English comments,
    many files longer than 8x the training length); ``docs``: its documentation and docstrings
    (~1 MB: too little for more than a few hundred steps)."""
    from megatron_qwen.data.real_corpus import python_doc_topics, python_docstrings, python_sources
    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer()
    if name == "sources":
        records = list(python_sources(int(max_mb * 1e6)))
    else:
        records = list(python_doc_topics()) + list(python_docstrings())
    ids = tok.encode_batch([d["text"] for d in records])
    counts = collections.Counter(t for doc in ids for t in doc)
    remap = np.zeros(tok.vocab_size, dtype=np.int64)  # rarer tokens -> 0
    for i, (t, _) in enumerate(counts.most_common(vocab - 1)):
        remap[t] = i + 1
    docs = [remap[np.asarray(doc, dtype=np.int64)] for doc in ids]
    long_docs = [i for i, d in enumerate(docs) if len(d) >= min_len]
    held = set(long_docs[::holdout_every])
    train = np.concatenate([d for i, d in enumerate(docs) if i not in held])
    return train, [docs[i] for i in sorted(held)]


def train_model(cfg: ModelConfig, stream: np.ndarray, steps: int, batch: int, lr: float, log):
    """A plain loop over the megatron-core model (TP=PP=1): AdamW, warm-up then cosine to 10%."""
    from megatron_qwen.model import build_model

    (model,) = build_model(cfg, ParallelConfig())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup))))))
    rng = np.random.default_rng(0)
    seq = cfg.seq_length
    positions = torch.arange(seq).expand(batch, seq)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        starts = rng.integers(0, len(stream) - seq - 1, size=batch)
        window = torch.from_numpy(np.stack([stream[s:s + seq + 1] for s in starts]))
        loss = model(window[:, :-1], positions, None, labels=window[:, 1:]).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    model.final_loss = loss.item()
    return model.eval()


def save(model, cfg: ModelConfig, held_out, out: Path) -> tuple:
    """The model as a torch_dist checkpoint, the held-out docs as an indexed dataset."""
    import shutil

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_qwen.checkpoint.mcore_io import save_mcore_checkpoint

    ckpt = out / "ckpt"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    save_mcore_checkpoint(ckpt, tensors, cfg, ParallelConfig(), {"source": "bench/long_context_table.py"})
    prefix = out / "heldout_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for d in held_out:
        builder.add_document(torch.from_numpy(d.astype(np.int32)), [len(d)])
    builder.finalize(f"{prefix}.idx")
    return ckpt, prefix


def hf_peer(model, cfg: ModelConfig, samples_by_length, train_length: int):
    """transformers' Qwen2ForCausalLM on the same weights: plain and its 'dynamic' rope scaling."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_qwen.checkpoint import mcore_to_hf_state_dict

    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf_state = mcore_to_hf_state_dict(state, cfg, cfg.vocab_size_padded(1), fmt="qwen2")
    out = {}
    for name, scaling in (("transformers plain", None),
                          ("transformers rope_scaling=dynamic", {"rope_type": "dynamic", "factor": 2.0})):
        config = Qwen2Config(
            vocab_size=cfg.vocab_size_padded(1), hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
            max_position_embeddings=train_length, rms_norm_eps=cfg.norm_epsilon,
            rope_theta=cfg.rotary_base, tie_word_embeddings=False, use_sliding_window=False)
        if scaling:
            config.rope_parameters = {"rope_theta": cfg.rotary_base, **scaling}
        config._attn_implementation = "eager"
        hf = Qwen2ForCausalLM(config).float().eval()
        hf.load_state_dict(hf_state, strict=False)
        row = {}
        with torch.no_grad():
            for length, samples in samples_by_length.items():
                logits = hf(samples[:, :-1]).logits.float()
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                        samples[:, 1:].reshape(-1))
                row[length] = math.exp(nll.item())
        out[name] = row
    return out


def main() -> None:
    from megatron_qwen.inference.loading import load_model
    from megatron_qwen.inference.perplexity import (evaluate_table, format_table, load_documents,
                                                    make_samples, perplexity, settings)
    from megatron_qwen.runtime import destroy, init_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--corpus", choices=CORPORA, default="sources")
    p.add_argument("--corpus-mb", type=float, default=32.0, help="at most this much source text")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--window-rules", default="linear:32:128,uniform:128",
                   help="comma-separated rules; one table row each (window rows add NTK + LogN)")
    p.add_argument("--out", default="/tmp/long_context_bench")
    args = p.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    L = args.seq_length
    lengths = [L, 2 * L, 4 * L, 8 * L]
    cfg = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_heads,
                      ffn_hidden_size=(8 * args.hidden_size // 3 + 7) // 8 * 8,
                      vocab_size=args.vocab, seq_length=L, max_position_embeddings=16 * L)
    cfg.padded_vocab_size = cfg.vocab_size_padded(1)
    train, held = corpus(args.corpus, args.vocab, 8 * L + 1, args.corpus_mb)
    log(f"corpus: {len(train)} training tokens, {len(held)} held-out documents of >= {8 * L + 1} tokens")
    init_distributed(ParallelConfig(), seed=0)
    t0 = time.perf_counter()
    model = train_model(cfg, train, args.steps, args.batch, args.lr, log)
    train_s = time.perf_counter() - t0
    final_loss = model.final_loss
    ckpt, prefix = save(model, cfg, held, out)
    destroy()

    # the evaluation: the checkpoint as tools/eval_ppl.py loads it
    init_distributed(ParallelConfig(), seed=0)
    chunks, _ = load_model(str(ckpt))
    docs = load_documents(str(prefix))
    rules = [r for r in args.window_rules.split(",") if r]
    rows = settings("table3", rules[0])
    for rule in rules[1:]:
        rows += [r for r in settings("ntk+logn+window", rule)]
    t0 = time.perf_counter()
    table = {}
    for row in rows:  # the window rule is part of the label when several are compared
        label = row.label + (f" ({row.window_rule})" if row.window_rule != "none" else "")
        table[label] = evaluate_table(chunks, docs, lengths, [row], args.num_samples, "documents",
                                      eod=0)[row.label]
    eval_s = time.perf_counter() - t0
    samples = {n: make_samples(docs, n, args.num_samples, "documents", eod=0) for n in lengths}
    ours_plain = {n: perplexity(chunks, samples[n]) for n in lengths}
    peer = hf_peer(chunks[0], cfg, samples, L)
    table.update(peer)
    print()
    print(format_table(table, lengths, title=f"tiny Qwen (trained at {L})"))
    (out / "table.json").write_text(json.dumps({"train_length": L, "final_loss": final_loss,
                                                "rows": {k: {str(n): v for n, v in row.items()}
                                                         for k, row in table.items()}}, indent=1))
    ratio = peer["transformers plain"][L] / ours_plain[L]
    print(f"\nplain RoPE at the training length: transformers / ours = {ratio:.6f}")
    print(f"training {args.steps} steps: {train_s:.0f} s; evaluation: {eval_s:.0f} s")
    print(f"same table from the command line:\n  python tools/eval_ppl.py --load {ckpt} --data {prefix} "
          f"--seq-lengths {','.join(map(str, lengths))} --num-samples {args.num_samples} "
          f"--window-rule {rules[0]}")
    destroy()


if __name__ == "__main__":
    main()
