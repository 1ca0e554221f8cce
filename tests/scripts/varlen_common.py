"""Shared by tests/test_varlen.py and its 2-process worker: a packed micro-batch as the SFT
dataset ships it, the dense masks of the same documents, the masked token mean."""

from __future__ import annotations

import torch

from megatron_qwen.model import varlen

SEQ = 24
DOCS = [[10, 14], [5, 12, 7]]  # document lengths of the two samples of the micro-batch


def packed_batch(vocab: int, docs=DOCS, seq=SEQ, seed=0):
    """A collated micro-batch of len(docs) samples with ``cu_seqlens`` (no mask)."""
    g = torch.Generator().manual_seed(seed)
    b = len(docs)
    return {
        "tokens": torch.randint(0, vocab, (b, seq), generator=g),
        "labels": torch.randint(0, vocab, (b, seq), generator=g),
        "loss_mask": (torch.rand(b, seq, generator=g) < 0.7).float(),
        "position_ids": torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in docs]),
        "cu_seqlens": torch.stack([varlen.padded_cu_seqlens(row, seq) for row in docs]),
    }


def documents(batch):
    """(row, start, end) of every document of the batch."""
    for row, cu in enumerate(batch["cu_seqlens"]):
        bounds = cu[cu >= 0].tolist()
        yield from ((row, a, b) for a, b in zip(bounds[:-1], bounds[1:]))


def dense_masks(batch):
    """[b, 1, s, s] block-diagonal causal masks (True = masked), the dense path's input."""
    s = batch["tokens"].size(1)
    return torch.stack([varlen.block_causal_mask(cu[cu >= 0], s)[None] for cu in batch["cu_seqlens"]])


def masked_mean(per_token, loss_mask):
    mask = loss_mask.reshape(-1)
    return (per_token.reshape(-1) * mask).sum() / mask.sum()
