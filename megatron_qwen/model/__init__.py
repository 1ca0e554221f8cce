"""The Qwen decoder on megatron-core: layer spec, RMSNorm, core attention backends, builder.

Where megatron-core cannot be imported (the bare GPU machine running bench/mfu.py's peer;
tests/test_bench_mfu.py) the package still imports, so the data side can use ``model.varlen``
(cu_seqlens helpers, plain torch); the builder's names then raise the ImportError on use."""

try:
    from megatron_qwen.model.builder import build_model, check_layout, count_parameters, transformer_config
    from megatron_qwen.model.transformer_config import QwenTransformerConfig
except ImportError as _missing:  # megatron-core absent
    _why = _missing

    def __getattr__(name):
        if name in __all__:
            raise ImportError(f"megatron_qwen.model.{name} needs megatron-core: {_why}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["QwenTransformerConfig", "build_model", "check_layout", "count_parameters", "transformer_config"]
