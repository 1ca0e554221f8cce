"""One checkpoint, two layer layouts: local (our RMSNorm modules) and Transformer Engine (the
norm fused into the next linear).

The two layouts differ in the names of the two norms of each layer and in nothing else: TE's
``TELayerNormColumnParallelLinear`` holds the norm as ``layer_norm_weight`` (replicated over TP,
as our RMSNorm weight), and TE's non-FP8 ``_extra_state`` sits on the same four linears whose
local versions checkpoint an empty one (megatron-core's local linears ignore TE's on load; TE's
ignore an empty one). megatron-core's own local spec states the same correspondence in its
``sharded_state_dict_keys_map``. So a checkpoint of either layout loads into a model of either
layout by renaming, at load time, the model's requested keys to the names the checkpoint holds
(:func:`match_checkpoint_layout`, called by every model load). Tested on CPU by the key mapping
(tests/test_te_layout.py); a real TE model loading it is unverified on GPU."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from megatron_qwen.checkpoint.mapping import CheckpointError

# dist-checkpoint keys (layers stacked: no layer index) local -> Transformer Engine
LOCAL_TO_TE = {
    "decoder.layers.input_layernorm.weight": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.pre_mlp_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
}
TE_TO_LOCAL = {te: local for local, te in LOCAL_TO_TE.items()}
OTHER_LAYOUT = {**LOCAL_TO_TE, **TE_TO_LOCAL}


def match_checkpoint_layout(model_state: Mapping[str, dict], saved_keys: Iterable[str]) -> int:
    """Rename in place each sharded tensor of the model's sharded state dicts
    (``{"model": ..., "model1": ...}``) whose key the checkpoint lacks but holds under the other
    layout's name; return how many were renamed. Run before the optimizer's sharded state dict
    is built from the model's, so the optimizer state follows the same names."""
    saved = set(saved_keys)
    renamed = 0
    for sub in model_state.values():
        for item in sub.values():
            key = getattr(item, "key", None)
            other = OTHER_LAYOUT.get(key)
            if key not in saved and other in saved:
                item.key = other
                renamed += 1
    return renamed


def load_model_state(module: torch.nn.Module, state: Mapping, source) -> None:
    """``module.load_state_dict(state)``, strict except for ``_extra_state`` entries the
    checkpoint never holds (a TE model's core attention: megatron-core's TE attention leaves its
    FP8 metadata out of the sharded state dict, so TE starts it afresh)."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
    if missing or result.unexpected_keys:
        what = (f"missing {', '.join(missing[:3])}" if missing
                else f"unexpected {', '.join(result.unexpected_keys[:3])}")
        raise CheckpointError(f"{source}: the checkpoint does not fit the model ({what})")
