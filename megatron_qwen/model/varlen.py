"""Packed sequences as varlen ("THD") attention: the contract, its CPU reference, the GPU kernels.

The contract (megatron-core's ``PackedSeqParams`` with ``qkv_format="thd"``): a micro-batch is
one row of ``t`` tokens holding several documents back to back, ``cu_seqlens`` (int32,
``[n + 1]``, 0 first, ``t`` last) marks where each starts. megatron-core squeezes the batch
dimension away before core attention, so a kernel gets ``q [t, np, hn]``, ``k, v [t, ng, hn]``
and returns ``[t, np, hn]``. Token ``i`` of a document attends to the tokens of the same document
at or before it, and with a layer window ``w`` only to the last ``w`` of those (itself included);
RoPE restarts at each document (megatron-core's ``apply_rotary_pos_emb`` with ``cu_seqlens``).

Kernels behind the contract (:func:`select_kernel` picks one, :func:`run_kernel` calls it):

- ``reference``: one SDPA call per document (causal, or with the window mask); plain torch on any
  device and dtype. It *defines* correctness: the THD output is each document run alone.
- ``dense``: one SDPA call with the block-diagonal causal (and window) mask built here from
  ``cu_seqlens``: the fallback on a GPU without a varlen kernel (the mask is built on the device,
  never shipped by the DataLoader).
- ``flash``: flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16, head dim <= 256): no
  mask, native GQA, the window as ``window_size``.
- ``flex``: torch's FlexAttention with a document (and window) ``BlockMask``, compiled on CUDA;
  any dtype, native GQA, no attention dropout.

Transformer Engine's ``TEDotProductAttention`` takes the same ``PackedSeqParams`` natively, so a
TE layer spec needs nothing from here.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def window_mask(sq: int, sk: int, window: int, device=None) -> torch.Tensor:
    """[sq, sk] boolean, True = masked: query i (absolute position sk - sq + i) sees the keys
    j with pos - window < j <= pos (itself and the window - 1 before it)."""
    q_pos = torch.arange(sk - sq, sk, device=device)[:, None]
    k_pos = torch.arange(sk, device=device)[None, :]
    return (k_pos > q_pos) | (k_pos <= q_pos - window)


try:  # flash-attn is a GPU extra
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch version
    create_block_mask = flex_attention = None

KERNELS = ("reference", "dense", "flash", "flex")
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # flash_attn refuses every other dtype
FLASH_MAX_HEAD_DIM = 256
CU_SEQLENS_PAD = -1  # a sample's cu_seqlens is padded to a fixed length with this (collatable)


# --------------------------------------------------------------------------- the data side


def padded_cu_seqlens(lengths: Sequence[int], seq_length: int) -> torch.Tensor:
    """One sample's document boundaries as a fixed-size int32 vector ``[seq_length + 1]``:
    ``0, l0, l0 + l1, ..., seq_length`` then ``CU_SEQLENS_PAD``; fixed size so that the
    DataLoader's default collate stacks samples (4 bytes per position instead of a
    ``[s, s]`` mask)."""
    out = torch.full((seq_length + 1,), CU_SEQLENS_PAD, dtype=torch.int32)
    bounds = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    if bounds[-1] != seq_length or any(n <= 0 for n in lengths):
        raise ValueError(f"document lengths {list(lengths)} must be positive and sum to {seq_length}")
    out[: len(bounds)] = bounds.to(torch.int32)
    return out


def thd_micro_batch(batch: dict):
    """A collated micro-batch of packed samples (``tokens`` etc. ``[b, s]``, ``cu_seqlens``
    ``[b, s + 1]``) as one THD row: (tokens, position_ids, labels, loss_mask), each ``[1, b*s]``,
    and the ``PackedSeqParams`` (cu_seqlens on the tokens' device). Position ids restart at each
    document. The boundaries are read on the host, before the batch moves to the device."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"]
    b, s = batch["tokens"].shape
    bounds = [0]
    for row in range(b):
        kept = cu[row][cu[row] != CU_SEQLENS_PAD].to(torch.int64)
        if kept.numel() < 2 or kept[0] != 0 or kept[-1] != s or bool((kept[1:] <= kept[:-1]).any()):
            raise ValueError(f"cu_seqlens of sample {row} is not 0 < ... < {s}: {kept.tolist()}")
        bounds.extend((kept[1:] + row * s).tolist())
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1].to(torch.int64), lengths.to(torch.int64))
    flat = {k: batch[k].reshape(1, b * s) for k in ("tokens", "labels", "loss_mask")}
    flat["position_ids"] = (torch.arange(b * s) - starts).reshape(1, b * s)
    max_seqlen = int(lengths.max())
    return flat, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                 max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def packed_to_device(packed, device):
    """The PackedSeqParams with its cu_seqlens on ``device`` (one copy shared by q and kv)."""
    cu = packed.cu_seqlens_q.to(device, non_blocking=True)
    packed.cu_seqlens_q = packed.cu_seqlens_kv = cu
    return packed


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[t] int64: the document each token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


def positions_in_documents(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[t] int64: each token's 0-based position inside its document."""
    starts = cu_seqlens[:-1].to(torch.int64)[document_ids(cu_seqlens, total)]
    return torch.arange(total, device=cu_seqlens.device) - starts


def block_causal_mask(cu_seqlens: torch.Tensor, total: int, window: Optional[int] = None) -> torch.Tensor:
    """[t, t] bool, True = masked out (megatron's convention): token i sees j only if j <= i in
    the same document (and, with a window, i - j < window). The dense path's mask."""
    doc = document_ids(cu_seqlens, total)
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool,
                                                            device=doc.device).tril()
    masked = ~allowed
    if window is not None:
        masked |= window_mask(total, total, window, doc.device)
    return masked


# --------------------------------------------------------------------------- selection


def select_kernel(backend: str, device_type: str, dtype: torch.dtype, head_dim: int,
                  dropout_p: float, flash_available: bool, flex_available: bool) -> tuple[str, str]:
    """(kernel, why) for THD attention on this device. Pure: the machine is in the arguments,
    so the GPU choice is tested on CPU. ``backend`` is ``model.attention_backend``: ``unfused``
    asks for the readable reference everywhere."""
    if backend == "unfused":
        return "reference", "model.attention_backend=unfused"
    if device_type != "cuda":
        return "reference", f"on {device_type}: per-document SDPA"
    if flash_available and dtype in FLASH_DTYPES and head_dim <= FLASH_MAX_HEAD_DIM:
        return "flash", "flash_attn_varlen_func"
    if flex_available and dropout_p == 0.0:
        why = "flash-attn not installed" if not flash_available else (
            f"flash-attn refuses {str(dtype).removeprefix('torch.')}" if dtype not in FLASH_DTYPES
            else f"flash-attn refuses head dim {head_dim}")
        return "flex", f"FlexAttention document mask ({why})"
    return "dense", "block-diagonal mask + SDPA (no varlen kernel for this dtype/dropout)"


@functools.lru_cache(maxsize=None)
def log_selection(kernel: str, why: str) -> None:
    """Say once per process which kernel packed attention uses (rank 0)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"packed (THD) attention: {kernel} ({why})", flush=True)


# --------------------------------------------------------------------------- kernels


def _repeat_kv(q, k, v):
    rep = q.size(1) // k.size(1)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return k, v


def reference(q, k, v, cu_seqlens, scale: float, window: Optional[int] = None, dropout_p: float = 0.0):
    """Each document alone: SDPA over its tokens, causal (or with the window mask)."""
    k, v = _repeat_kv(q, k, v)
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [heads, n, hn]
        n = end - start
        mask = None if window is None else ~window_mask(n, n, window, q.device)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, is_causal=mask is None,
                                                   dropout_p=dropout_p, scale=scale).transpose(0, 1))
    return torch.cat(outs, dim=0)


def dense(q, k, v, cu_seqlens, scale: float, window: Optional[int] = None, dropout_p: float = 0.0):
    """One SDPA call with the block-diagonal causal mask built from cu_seqlens."""
    k, v = _repeat_kv(q, k, v)
    attend = ~block_causal_mask(cu_seqlens, q.size(0), window)
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)),
                                         attn_mask=attend, dropout_p=dropout_p, scale=scale)
    return out[0].transpose(0, 1)


def flash(q, k, v, cu_seqlens, scale: float, window: Optional[int] = None, dropout_p: float = 0.0,
          max_seqlen: Optional[int] = None):
    """flash-attn's varlen kernel: refuses masks (it takes none) and fp32 (checked here)."""
    if q.dtype not in FLASH_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attn_varlen_func takes fp16/bf16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p,
                                  softmax_scale=scale, causal=True,
                                  window_size=(-1, 0) if window is None else (window - 1, 0))


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


_BLOCK_MASKS: dict = {}  # (window, t) -> (cu_seqlens, BlockMask) of the micro-batch in flight


def _block_mask(cu_seqlens, t: int, window: Optional[int]):
    """The document BlockMask, built once per micro-batch and window (every layer of a forward
    gets the same cu_seqlens tensor; the cache holds it, so its identity is not reused)."""
    key = (window, t)
    cached = _BLOCK_MASKS.get(key)
    if cached is not None and cached[0] is cu_seqlens:
        return cached[1]
    doc = document_ids(cu_seqlens, t)

    def mask_mod(b, h, qi, ki):
        keep = (doc[qi] == doc[ki]) & (qi >= ki)
        return keep if window is None else keep & (qi - ki < window)

    block = create_block_mask(mask_mod, None, None, t, t, device=cu_seqlens.device)
    _BLOCK_MASKS[key] = (cu_seqlens, block)
    return block


def flex(q, k, v, cu_seqlens, scale: float, window: Optional[int] = None, dropout_p: float = 0.0):
    """FlexAttention with a document (+ causal, + window) BlockMask; compiled on CUDA (eager
    elsewhere, where it materialises the scores and has no backward on CPU)."""
    if dropout_p:
        raise ValueError("FlexAttention has no attention dropout")
    block = _block_mask(cu_seqlens, q.size(0), window)
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    out = fn(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=block, scale=scale,
             enable_gqa=k.size(1) != q.size(1))
    return out[0].transpose(0, 1)


def run_kernel(kernel: str, q, k, v, cu_seqlens, scale: float, window: Optional[int] = None,
               dropout_p: float = 0.0, max_seqlen: Optional[int] = None):
    """q [t, np, hn], k, v [t, ng, hn] -> [t, np, hn] with the named kernel."""
    if kernel == "flash":
        return flash(q, k, v, cu_seqlens, scale, window, dropout_p, max_seqlen)
    fn = {"reference": reference, "dense": dense, "flex": flex}.get(kernel)
    if fn is None:
        raise ValueError(f"unknown THD attention kernel {kernel!r}: choose {', '.join(KERNELS)}")
    return fn(q, k, v, cu_seqlens, scale, window, dropout_p)
