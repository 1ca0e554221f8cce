"""megatron_qwen: the Qwen technical report (1.8B/7B/14B) on megatron-core and DeepSpeed."""

__version__ = "0.1.0"
