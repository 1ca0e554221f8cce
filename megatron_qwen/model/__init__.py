"""The Qwen decoder on megatron-core: layer spec, RMSNorm, core attention backends, builder."""

from megatron_qwen.model.builder import build_model, check_layout, count_parameters, transformer_config
from megatron_qwen.model.transformer_config import QwenTransformerConfig

__all__ = ["QwenTransformerConfig", "build_model", "check_layout", "count_parameters", "transformer_config"]
