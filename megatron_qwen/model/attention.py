"""Core attention for the Qwen layer: softmax(q k^T * scale + mask) v, with the kernel chosen by
``ModelConfig.attention_backend``.

It is the ``core_attention`` submodule of megatron-core's ``SelfAttention`` (which does the
QKV projection, RoPE and the output projection): it receives per-partition
``q [sq, b, np, hn]``, ``k, v [sk, b, ng, hn]`` and returns ``[sq, b, np * hn]``.

Backends:
- ``sdpa``    torch.nn.functional.scaled_dot_product_attention (default). Honours an explicit
              boolean mask ``[b, 1, sq, sk]`` (True = masked out, megatron's convention), which
              packed SFT sequences use for a block-diagonal causal mask; without one it is causal.
- ``flash``   flash_attn.flash_attn_func (GPU, fp16/bf16), causal only.
- ``unfused`` plain matmul + FP32 softmax: the readable reference.

Packed documents come as megatron-core's ``PackedSeqParams`` (``qkv_format="thd"``, one
``cu_seqlens``) instead of a mask; ``model/varlen.py`` holds that contract, its per-document
reference and the kernels (flash-attn varlen, FlexAttention, a block mask built on the device),
chosen per device and dtype and logged once. A dense ``attention_mask`` is still honoured as the
fallback for data that ships one.

The module knows its layer number and the whole config, so the long-context pieces of report
section 2.5 (LogN query scaling past the training length, a window per layer) are additions to
``_prepare`` / the mask here, selected by config fields, not new modules.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_qwen.model import varlen
from megatron_qwen.model.long_context import layer_window, logn_at, logn_factors, window_mask
from megatron_qwen.model.transformer_config import QwenTransformerConfig

try:  # flash-attn is a GPU extra; the error is raised at build time if it is asked for
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

BACKENDS = ("sdpa", "flash", "unfused")
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # flash_attn refuses every other dtype
FLASH_MAX_HEAD_DIM = 256  # flash_attn 2's largest head dimension


def check_attention_kernel(backend: str, dtype: torch.dtype, device_type: str,
                           flash_available: bool, head_dim: int,
                           mask_from: Optional[str] = None, dtype_from: str = "") -> None:
    """Refuse, before anything is built, every combination the chosen kernel would refuse at its
    first forward: a ConfigError (one line naming the fields) instead of a crash on the GPU.

    ``mask_from`` names the setting that feeds the kernel an explicit dense attention mask
    (none of the built-in tasks: packed documents come as cu_seqlens), ``dtype_from`` the setting that
    chose ``dtype``. Pure: the device and flash availability are arguments, so the GPU case is
    checked on CPU."""
    from megatron_qwen.config import ConfigError

    if backend not in BACKENDS:
        raise ConfigError(f"model.attention_backend={backend!r}: choose {', '.join(BACKENDS)}")
    if backend != "flash":
        return
    fix = "or set model.attention_backend=sdpa (--attention-backend sdpa)"
    if not flash_available:
        raise ConfigError("model.attention_backend=flash needs the flash_attn package "
                          f"(pip install flash-attn --no-build-isolation), {fix}")
    if device_type != "cuda":
        raise ConfigError(f"model.attention_backend=flash runs on CUDA GPUs only and this run is on "
                          f"{device_type}; {fix.removeprefix('or ')}")
    if dtype not in FLASH_DTYPES:
        why = f" ({dtype_from})" if dtype_from else ""
        raise ConfigError(f"model.attention_backend=flash takes bf16/fp16 only and this run computes "
                          f"in {str(dtype).removeprefix('torch.')}{why}: use bf16, {fix}")
    if head_dim > FLASH_MAX_HEAD_DIM:
        raise ConfigError(f"model.attention_backend=flash supports head dims up to {FLASH_MAX_HEAD_DIM}, "
                          f"this model has {head_dim} (model.hidden_size / model.num_attention_heads); "
                          f"{fix.removeprefix('or ')}")
    if mask_from:
        raise ConfigError(f"model.attention_backend=flash is causal-only and {mask_from} feeds it an "
                          f"explicit attention mask; {fix.removeprefix('or ')} (packed documents take flash_attn_varlen_func when they come as cu_seqlens)")


def causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """[sq, sk] boolean, True = masked: query i (the (sk - sq + i)-th position) sees keys <= it."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)


class QwenCoreAttention(MegatronModule):
    """Scaled dot-product attention over one tensor-parallel partition of the heads."""

    def __init__(
        self,
        config: QwenTransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("QwenCoreAttention does not support context parallelism")
        self.backend = getattr(config, "qwen_attention_backend", "sdpa")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.attention_backend={self.backend!r}: choose {', '.join(BACKENDS)}")
        if self.backend == "flash" and flash_attn_func is None:
            raise ImportError("model.attention_backend=flash needs the flash_attn package (pip install flash-attn)")
        self.layer_number = max(1, layer_number)  # 1-based, global across pipeline stages
        self.attn_mask_type = attn_mask_type
        tp = config.tensor_model_parallel_size
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = max(1, config.num_query_groups // tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    # ------------------------------------------------------------------ helpers

    def _dropout_rng(self):
        """Dropout on TP-partitioned heads must differ per TP rank: megatron's forked RNG."""
        if self.training and self.dropout_p > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _prepare(self, query, key, value):
        """[s, b, heads, hn] -> [b, heads, s, hn], with K/V groups repeated to the query heads,
        and at inference with use_logn_attn the queries past the training length scaled by LogN
        (report 2.5; the queries are the last sq of sk positions)."""
        rep = self.heads_per_partition // self.groups_per_partition
        if rep > 1:
            key = key.repeat_interleave(rep, dim=2)
            value = value.repeat_interleave(rep, dim=2)
        sq, sk = query.size(0), key.size(0)
        train_length = self.config.training_seq_length
        if getattr(self.config, "use_logn_attn", False) and not self.training and sk > train_length:
            factors = logn_factors(sk - sq, sk, train_length, device=query.device)
            query = query * factors.to(query.dtype)[:, None, None, None]
        return (t.permute(1, 2, 0, 3) for t in (query, key, value))

    def _window(self) -> Optional[int]:
        """This layer's attention window at inference (report 2.5), None for full attention."""
        if self.training:
            return None
        return layer_window(getattr(self.config, "window_sizes", None), self.layer_number)

    @staticmethod
    def _with_window(attention_mask, window: int, sq: int, sk: int, device):
        """The causal (or given) mask with the keys outside the window masked too."""
        outside = window_mask(sq, sk, window, device)
        return outside if attention_mask is None else attention_mask | outside

    # ------------------------------------------------------------------ backends

    def _sdpa(self, q, k, v, attention_mask):
        sq, sk = q.size(2), k.size(2)
        if attention_mask is None and sq != sk:  # queries are the last sq of sk positions
            attention_mask = causal_mask(sq, sk, q.device)
        mask = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
        )

    def _unfused(self, q, k, v, attention_mask):
        scores = torch.matmul(q, k.transpose(-2, -1)).float() * self.softmax_scale
        if attention_mask is None:
            attention_mask = causal_mask(q.size(2), k.size(2), q.device)
        scores = scores.masked_fill(attention_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        probs = F.dropout(probs, p=self.dropout_p, training=self.training)
        return torch.matmul(probs, v)

    def _flash(self, q, k, v, attention_mask, window: Optional[int] = None):
        if attention_mask is not None:
            raise ValueError(
                "model.attention_backend=flash is causal only; an explicit attention mask "
                "(packed sequences) needs attention_backend=sdpa"
            )
        # flash_attn takes [b, s, heads, hn]
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=self.dropout_p if self.training else 0.0,
            softmax_scale=self.softmax_scale, causal=True,
            window_size=(-1, 0) if window is None else (window - 1, 0),
        )
        return out.transpose(1, 2)

    # ------------------------------------------------------------------ packed (THD)

    def _packed(self, query, key, value, attention_mask, packed):
        """Packed documents (model/varlen.py): q [t, np, hn], k, v [t, ng, hn] -> [t, np * hn],
        with the kernel chosen for this device and dtype; LogN scales each query by its position
        inside its own document, the layer window applies inside each document."""
        if packed.qkv_format != "thd":
            raise ValueError(f"packed_seq_params.qkv_format={packed.qkv_format!r}: QwenCoreAttention takes thd")
        if attention_mask is not None:
            raise ValueError("packed sequences carry their documents in packed_seq_params.cu_seqlens; "
                             "pass attention_mask=None with them")
        cu = packed.cu_seqlens_q
        kv = packed.cu_seqlens_kv
        if packed.cu_seqlens_q_padded is not None or (kv is not None and kv is not cu and not torch.equal(kv, cu)):
            raise ValueError("QwenCoreAttention takes self-attention THD with one cu_seqlens and no padding")
        t = query.size(0)
        train_length = self.config.training_seq_length
        max_seqlen = packed.max_seqlen_q
        if (getattr(self.config, "use_logn_attn", False) and not self.training
                and (max_seqlen is None or max_seqlen > train_length)):
            pos = varlen.positions_in_documents(cu, t)
            factors = logn_at(pos, train_length)
            query = query * factors.to(query.dtype)[:, None, None]
        kernel, why = varlen.select_kernel(
            self.backend, query.device.type, query.dtype, self.head_dim,
            self.dropout_p if self.training else 0.0,
            flash_available=varlen.flash_attn_varlen_func is not None,
            flex_available=varlen.flex_attention is not None)
        varlen.log_selection(kernel, why)
        self.last_packed_kernel = kernel
        with self._dropout_rng():
            out = varlen.run_kernel(kernel, query, key, value, cu, self.softmax_scale, self._window(),
                                    self.dropout_p if self.training else 0.0, max_seqlen)
        return out.reshape(t, self.heads_per_partition * self.head_dim)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("QwenCoreAttention takes no attention_bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, attention_mask, packed_seq_params)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be boolean (True = masked), got {attention_mask.dtype}")
        sq, b = query.shape[:2]
        q, k, v = self._prepare(query, key, value)
        window = self._window()
        if window is not None and self.backend != "flash":
            attention_mask = self._with_window(attention_mask, window, q.size(2), k.size(2), q.device)
        with self._dropout_rng():
            if self.backend == "sdpa":
                out = self._sdpa(q, k, v, attention_mask)
            elif self.backend == "unfused":
                out = self._unfused(q, k, v, attention_mask)
            else:
                out = self._flash(q, k, v, attention_mask, window)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)


