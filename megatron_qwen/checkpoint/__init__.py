"""Checkpoint conversion: Hugging Face (qwen, qwen2 layouts) <-> megatron-core torch_dist, resharding.

``mapping`` holds the names, shapes and tensor surgery (usable on its own, e.g. in parity tests);
``hf_io`` reads and writes HF checkpoints tensor by tensor; ``mcore_io`` reads and writes
megatron-core distributed checkpoints without building the model; ``convert`` ties them together
for ``tools/convert_checkpoint.py``.
"""

from megatron_qwen.checkpoint.mapping import (
    CheckpointError,
    Shape,
    hf_to_mcore_state_dict,
    local_state_dict,
    mcore_to_hf_state_dict,
    model_config_from_hf,
    pad_vocab,
    tp_shard,
)

__all__ = [
    "CheckpointError",
    "Shape",
    "hf_to_mcore_state_dict",
    "local_state_dict",
    "mcore_to_hf_state_dict",
    "model_config_from_hf",
    "pad_vocab",
    "tp_shard",
]
