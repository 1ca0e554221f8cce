"""Shared by the SFT training tests: a small real instruction set, a small BPE, a base model.

CPU time is the constraint: the full 151,851-token vocabulary makes the logits of a tiny model
cost more than the model. The tokenizer here is Qwen's own BPE cut to its first
``BPE_RANKS`` merges (a valid BPE: every merge's parts have lower ranks) plus the 208 Qwen
special tokens, so ChatML rendering and loss masks are Qwen's exactly, in a 4,304-token vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BPE_RANKS = 4096
PADDED_VOCAB = 4352  # 4096 + 208 specials, padded to a multiple of 128 x TP (TP 1 and 2)
SEQ = 256
# the flags every SFT test run shares (tiny model shape = the converted base checkpoint's)
MODEL_FLAGS = ["--model.preset", "tiny", "--seq-length", str(SEQ), "--max-position-embeddings", "512",
               "--padded-vocab-size", str(PADDED_VOCAB), "--hidden-dropout", "0", "--attention-dropout", "0"]


def write_small_bpe(path: Path) -> int:
    """Qwen's first BPE_RANKS merges as a .tiktoken file; returns the tokenizer's vocab size."""
    from megatron_qwen.tokenizer.qwen import (QwenTokenizer, default_vocab_file, read_tiktoken_ranks,
                                              write_tiktoken_ranks)

    ranks = read_tiktoken_ranks(default_vocab_file())
    write_tiktoken_ranks({tok: r for tok, r in ranks.items() if r < BPE_RANKS}, path)
    return QwenTokenizer(path).vocab_size


def pick_conversations(demo_sft: Path, n_train: int, n_heldout: int) -> tuple[list, list]:
    """Short English conversations of the demo instruction set (tools/make_demo_data.py):
    ``n_train`` to learn, the next ``n_heldout`` never trained on."""
    rows = [json.loads(line) for line in demo_sft.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [r for r in rows if "Python documentation" in r["messages"][0]["content"]]
    words = [len(r["messages"][1]["content"].split()) for r in docs]
    short = [r for r, n in zip(docs, words) if 4 <= n <= 10]
    other = [r for r, n in zip(docs, words) if 10 < n <= 20]
    assert len(short) >= n_train and len(other) >= n_heldout, (len(short), len(other))
    return short[:n_train], other[:n_heldout]


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def base_hf_model(seed: int = 0):
    """A random tiny Qwen2ForCausalLM shaped like the `tiny` preset (the 'pretrained' model)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=PADDED_VOCAB, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():  # sharper than uniform, so that which tokens are averaged matters
        model.lm_head.weight.mul_(3.0)
    return model


def assistant_targets(ids: list, tok) -> list:
    """1 for every token that a reply's loss covers, found from the token ids alone: what follows
    ``<|im_start|>assistant\\n`` up to and including ``<|im_end|>`` (report 3.1)."""
    header = [tok.im_start_id] + tok.encode("assistant") + tok.encode("\n")
    mask, inside, i = [0] * len(ids), False, 0
    while i < len(ids):
        if not inside and ids[i:i + len(header)] == header:
            inside, i = True, i + len(header)
            continue
        if inside:
            mask[i] = 1
            inside = ids[i] != tok.im_end_id
        i += 1
    return mask


@torch.no_grad()
def hf_masked_loss(model, conversations: list, tok) -> tuple[float, float]:
    """(assistant-token mean, all-token mean) of the next-token cross entropy of an HF model over
    the conversations, each run alone (what packing with block-diagonal attention must equal)."""
    from megatron_qwen.tokenizer import render_chatml

    total = count = all_total = all_count = 0.0
    for conv in conversations:
        ids = render_chatml(conv["messages"], tok).ids
        target = torch.tensor(assistant_targets(ids, tok)[1:], dtype=torch.float64)
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        total += float((ce * target).sum())
        count += float(target.sum())
        all_total += float(ce.sum())
        all_count += ce.numel()
    return total / count, all_total / all_count
