"""megatron_qwen: the Qwen technical report (1.8B/7B/14B) on megatron-core and DeepSpeed."""

import warnings as _warnings

# megatron-core warns at import, once per module, that it falls back to torch without Transformer
# Engine/Apex: always true on CPU and stated in docs/model.md, so one line is enough.
_warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

__version__ = "0.1.0"
