"""megatron_qwen: the Qwen technical report (1.8B/7B/14B) on megatron-core and DeepSpeed."""

import warnings as _warnings

# Warnings a user can do nothing about, printed by the libraries on every run; each filter
# matches one exact message (tests/test_inference.py: generate/eval_ppl print no warning).
# - megatron-core falls back to torch without Transformer Engine/Apex: always true on CPU and
#   stated in docs/model.md.
_warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
_warnings.filterwarnings("ignore", message=r"Apex is not installed\. Falling back to Torch Norm",
                         category=UserWarning)
# - megatron-core 0.16's own TransformerConfig default (cuda_graph_scope="full") warns about itself.
_warnings.filterwarnings("ignore", message=r"full scope is deprecated\. Use empty cuda_graph_scope",
                         category=UserWarning)
# - megatron-core's dist_checkpointing calls torch.distributed.checkpoint APIs torch deprecates.
_warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated and will be removed",
                         category=FutureWarning)
_warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor",
                         category=FutureWarning)
_warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                         category=FutureWarning)

# Before anything imports megatron-core: what a supported version needs to import at all.
from megatron_qwen.runtime import mcore_version as _mcore_version  # noqa: E402

_mcore_version.install_import_shims()

__version__ = "0.1.0"
