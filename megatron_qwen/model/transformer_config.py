"""megatron-core's TransformerConfig plus the Qwen-only fields the core attention reads.

A dataclass subclass (as megatron-core's own MLATransformerConfig): every megatron module keeps
working with it, and QwenCoreAttention finds its backend and the long-context settings here."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

from megatron.core.transformer.transformer_config import TransformerConfig


@dataclasses.dataclass
class QwenTransformerConfig(TransformerConfig):
    qwen_attention_backend: str = "sdpa"  # ModelConfig.attention_backend: sdpa | flash | unfused
    training_seq_length: int = 2048  # ModelConfig.seq_length: LogN / dynamic NTK pivot on it
    use_dynamic_ntk: bool = False  # report 2.5; read by QwenRotaryEmbedding (long_context.py)
    use_logn_attn: bool = False  # report 2.5; read by QwenCoreAttention (attention.py)
    window_sizes: Optional[List[Optional[int]]] = None  # one window (or None) per layer
