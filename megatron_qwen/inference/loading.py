"""Load a megatron-core checkpoint for inference and switch the long-context techniques.

The model shape comes from the checkpoint (its ``megatron_qwen`` metadata or ``config.yaml``);
the layout (TP/PP) from the command line. The three techniques of report section 2.5 are read
from the live ``QwenTransformerConfig`` by the RoPE and the core attention, so one loaded model
serves every row of a Table-3 style evaluation: :func:`set_long_context` flips them in place.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from megatron_qwen.config import ConfigError, ModelConfig, ParallelConfig
from megatron_qwen.model.long_context import window_sizes_from_rule


@dataclasses.dataclass(frozen=True)
class LongContext:
    """One combination of the report's inference-time techniques."""

    dynamic_ntk: bool = False
    logn: bool = False
    window_rule: str = "none"  # see window_sizes_from_rule

    @property
    def label(self) -> str:
        parts = [name for name, on in (("dynamic_ntk", self.dynamic_ntk), ("logn", self.logn),
                                       ("window_attn", self.window_rule not in ("", "none")))
                 if on]
        return "+ " + " + ".join(parts) if parts else "plain RoPE"


def set_long_context(model_chunks, setting: LongContext) -> None:
    """Apply ``setting`` to a built model (all chunks share one TransformerConfig)."""
    config = model_chunks[0].config
    windows = window_sizes_from_rule(setting.window_rule, config.num_layers, config.training_seq_length)
    config.use_dynamic_ntk = setting.dynamic_ntk
    config.use_logn_attn = setting.logn
    config.window_sizes = windows


def checkpoint_model_config(load: str) -> ModelConfig:
    """The ModelConfig stored with a megatron-core checkpoint directory."""
    from megatron_qwen.checkpoint.mcore_io import McoreCheckpointReader

    return McoreCheckpointReader(load).cfg


def load_model(
    load: str,
    parallel_cfg: Optional[ParallelConfig] = None,
    params_dtype: torch.dtype = torch.float32,
    **model_overrides,
) -> Tuple[List[torch.nn.Module], ModelConfig]:
    """Build this rank's model chunks for the checkpoint at ``load`` and load its weights.

    Initialises torch.distributed and the model-parallel groups if nothing has (a single process
    needs no launcher). ``model_overrides`` replace ModelConfig fields that do not change the
    weights' shapes (attention_backend, use_dynamic_ntk, use_logn_attn, window_sizes, ...).
    """
    from megatron.core import parallel_state as ps

    from megatron_qwen.checkpoint.mcore_io import load_model_weights
    from megatron_qwen.model import build_model
    from megatron_qwen.runtime import device_check, init_distributed

    bf16 = params_dtype == torch.bfloat16
    device_check.use_gpu(bf16=bf16)  # before reading the checkpoint: a missing GPU fails first
    parallel_cfg = parallel_cfg or ParallelConfig()
    model_cfg = checkpoint_model_config(load)
    shape_fields = {"num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                    "ffn_hidden_size", "vocab_size", "padded_vocab_size"}
    bad = sorted(set(model_overrides) & shape_fields)
    if bad:
        raise ConfigError(f"{', '.join(bad)} come from the checkpoint {load} and cannot be overridden")
    model_cfg = dataclasses.replace(model_cfg, **model_overrides)
    model_cfg.validate()
    if not (torch.distributed.is_initialized() and ps.model_parallel_is_initialized()):
        init_distributed(parallel_cfg, bf16=bf16)
    chunks = build_model(model_cfg, parallel_cfg, params_dtype)
    load_model_weights(chunks, load)
    for chunk in chunks:
        chunk.eval()
    return chunks, model_cfg
