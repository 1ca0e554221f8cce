"""megatron_qwen: the Qwen technical report (1.8B/7B/14B) on megatron-core and DeepSpeed."""

import warnings as _warnings

# megatron-core warns at import, once per module, that it falls back to torch without Transformer
# Engine/Apex: always true on CPU and stated in docs/model.md, so one line is enough.
_warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# Before anything imports megatron-core: what a supported version needs to import at all.
from megatron_qwen.runtime import mcore_version as _mcore_version  # noqa: E402

_mcore_version.install_import_shims()

__version__ = "0.1.0"
