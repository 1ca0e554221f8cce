"""Training-free long context at inference (report section 2.5, Table 3).

Three techniques, each switchable per run through the config and inactive while training:

- dynamic NTK-aware interpolation: the RoPE base grows with the ratio of the current length to
  the training length. The rule is the released Qwen code's:
  ``alpha = max(2 ** ceil(log2(L / L_train) + 1) - 1, 1)`` and
  ``base' = base * alpha ** (d / (d - 2))`` (``d`` = rotary dim), so alpha is 1 up to the training
  length, 3 up to 2x, 7 up to 4x, 15 up to 8x.
- LogN scaling: the query at (0-based) position ``p`` is multiplied by ``log(p + 1, L_train)``
  when ``p + 1 > L_train``, else by 1 (the released ``logn_list``).
- window attention with a window per layer (shorter for lower layers), as a mask or, on GPU,
  flash-attn's ``window_size``.

The NTK base is applied by :class:`QwenRotaryEmbedding`, which the builder installs in place of
megatron-core's ``RotaryEmbedding``; LogN and the windows are applied by ``QwenCoreAttention``.
All three read the live ``QwenTransformerConfig``, so a built model can switch them between runs.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_qwen.model.varlen import window_mask  # noqa: F401  (plain torch; re-exported)


# --------------------------------------------------------------------------- dynamic NTK


def ntk_alpha(length: int, train_length: int) -> float:
    """The released Qwen ``get_ntk_alpha``: 1 up to the training length, then 2^k - 1."""
    context_value = math.log(length / train_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def ntk_base(base: float, rotary_dim: int, alpha: float) -> float:
    """NTK-aware base: base * alpha^(d / (d - 2))."""
    return base * alpha ** (rotary_dim / (rotary_dim - 2))


class QwenRotaryEmbedding(RotaryEmbedding):
    """megatron-core's RoPE table, with the base recomputed from the current length when
    ``config.use_dynamic_ntk`` is on and the model is in eval mode.

    The current length is the length of the sequence being processed: the input length, or with
    a megatron-core static KV cache, the cached prefix plus the new tokens (megatron-core caches
    keys before RoPE and rotates them every step, so the cached keys follow the new base and
    generation with the cache equals generation without it). The inverse frequencies stay FP32.
    """

    def __init__(self, config, kv_channels: int, rotary_base: float, **kwargs):
        super().__init__(kv_channels=kv_channels, rotary_percent=1.0, rotary_base=rotary_base,
                         **kwargs)
        self.config = config
        self.base = float(rotary_base)
        self.dim = kv_channels
        self._tables = {}  # (length, alpha) -> emb; small: one entry per length seen

    def current_alpha(self, length: int) -> float:
        if self.training or not getattr(self.config, "use_dynamic_ntk", False):
            return 1.0
        return ntk_alpha(length, self.config.training_seq_length)

    def inv_freq_for(self, alpha: float) -> torch.Tensor:
        base = ntk_base(self.base, self.dim, alpha)
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=self.inv_freq.device)
        return 1.0 / (base ** (exponent / self.dim))

    def get_rotary_seq_len(self, inference_context, transformer, transformer_input, transformer_config,
                           packed_seq_params=None, *, inference_params=None) -> int:
        """With a static KV cache: the cached prefix plus this step's tokens (megatron-core's
        default is the cache's maximum length, which would fix the NTK base for the whole run)."""
        context = inference_context or inference_params
        if context is None or packed_seq_params is not None or not context.is_static_batching():
            return super().get_rotary_seq_len(inference_context, transformer, transformer_input,
                                              transformer_config, packed_seq_params)
        current = (transformer.input_tensor if transformer is not None
                   and transformer.input_tensor is not None else transformer_input).size(0)
        if transformer_config.sequence_parallel:
            current *= transformer_config.tensor_model_parallel_size
        return context.sequence_len_offset + current

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group=None) -> torch.Tensor:
        alpha = self.current_alpha(max_seq_len)
        key = (max_seq_len, offset, alpha)
        if key not in self._tables:
            if len(self._tables) > 32:
                self._tables.clear()
            inv_freq = self.inv_freq
            if alpha != 1.0:
                self.inv_freq = self.inv_freq_for(alpha).to(inv_freq.device)
            try:
                self._tables[key] = self.get_emb(max_seq_len, offset)
            finally:
                if alpha != 1.0:
                    self.inv_freq = inv_freq
        emb = self._tables[key]
        group = cp_group if cp_group is not None else getattr(self, "cp_group", None)
        if group is not None and group.size() > 1 and not packed_seq:
            # the positions of this context-parallel rank's two sequence chunks
            emb = get_pos_emb_on_this_cp_rank(emb, 0, group)
        return emb


# --------------------------------------------------------------------------- LogN scaling


def logn_factors(start: int, end: int, train_length: int, device=None) -> torch.Tensor:
    """FP32 factors for 0-based positions [start, end): log(p + 1) / log(L_train) past the
    training length, 1 before it (the released ``logn_list`` indexed by position)."""
    return logn_at(torch.arange(start, end, device=device), train_length)


def logn_at(positions: torch.Tensor, train_length: int) -> torch.Tensor:
    """FP32 LogN factors at arbitrary 0-based positions (packed documents: each token's position
    inside its own document)."""
    counts = positions.to(torch.float64) + 1
    factors = torch.where(counts > train_length, torch.log(counts) / math.log(train_length),
                          torch.ones_like(counts))
    return factors.float()


# --------------------------------------------------------------------------- windows


def window_sizes_from_rule(rule: str, num_layers: int, train_length: int) -> Optional[List[Optional[int]]]:
    """Per-layer windows from a rule string (``--window-rule``):

    - ``none``: no windows (every layer attends to the whole context);
    - ``uniform:W``: window W in every layer;
    - ``linear:WMIN[:WMAX]``: shorter for lower layers, linear from WMIN at layer 0 to WMAX at
      the top layer (WMAX defaults to the training length; ``full`` leaves the top layer
      unwindowed and interpolates the others from WMIN to the training length);
    - ``list:W0,W1,...``: one entry per layer, ``full`` (or ``none``) for no window.
    """
    text = (rule or "none").strip()
    kind, _, arg = text.partition(":")

    def positive(value: str) -> int:
        try:
            window = int(value)
        except ValueError:
            raise ValueError(f"--window-rule {text!r}: {value!r} is not an integer window") from None
        if window < 1:
            raise ValueError(f"--window-rule {text!r}: windows must be >= 1, got {window}")
        return window

    if kind == "none" and not arg:
        return None
    if kind == "uniform":
        return [positive(arg)] * num_layers
    if kind == "linear":
        parts = arg.split(":")
        if not arg or len(parts) > 2:
            raise ValueError(f"--window-rule {text!r}: expected linear:WMIN or linear:WMIN:WMAX")
        w_min = positive(parts[0])
        top_full = len(parts) == 2 and parts[1] == "full"
        w_max = train_length if len(parts) == 1 or top_full else positive(parts[1])
        if w_max < w_min:
            raise ValueError(f"--window-rule {text!r}: WMAX={w_max} is smaller than WMIN={w_min}")
        steps = num_layers - 1 - int(top_full)
        windows: List[Optional[int]] = [
            round(w_min + (w_max - w_min) * i / steps) if steps > 0 else w_min
            for i in range(num_layers - int(top_full))
        ]
        if top_full:
            windows.append(None)
        return windows
    if kind == "list":
        items = [s.strip() for s in arg.split(",") if s.strip()]
        if len(items) != num_layers:
            raise ValueError(f"--window-rule {text!r}: {len(items)} windows for {num_layers} layers")
        return [None if s in ("full", "none") else positive(s) for s in items]
    raise ValueError(f"--window-rule {text!r}: choose none, uniform:W, linear:WMIN[:WMAX|:full] "
                     "or list:W0,W1,...")


def layer_window(window_sizes: Optional[Sequence[Optional[int]]], layer_number: int) -> Optional[int]:
    """The window of a 1-based (global) layer number, or None for full attention."""
    if not window_sizes:
        return None
    return window_sizes[layer_number - 1]
