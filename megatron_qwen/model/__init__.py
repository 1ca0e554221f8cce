"""The Qwen decoder on megatron-core: layer spec, RMSNorm, core attention backends, builder.

The names below load megatron-core on first use, not at import: the data side imports
``model.varlen`` (cu_seqlens helpers, plain torch), and must keep working where megatron-core
is absent (the bare GPU machine running bench/mfu.py's peer; tests/test_bench_mfu.py)."""

import importlib

_EXPORTS = {
    "build_model": "megatron_qwen.model.builder",
    "check_layout": "megatron_qwen.model.builder",
    "count_parameters": "megatron_qwen.model.builder",
    "transformer_config": "megatron_qwen.model.builder",
    "QwenTransformerConfig": "megatron_qwen.model.transformer_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
