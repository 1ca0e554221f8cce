"""Load a megatron-core checkpoint for inference and switch the long-context techniques.

The model shape comes from the checkpoint (its ``megatron_qwen`` metadata or ``config.yaml``);
the layout (TP/PP) from the command line. The three techniques of report section 2.5 are read
from the live ``QwenTransformerConfig`` by the RoPE and the core attention, so one loaded model
serves every row of a Table-3 style evaluation: :func:`set_long_context` flips them in place.
"""

from __future__ import annotations

import dataclasses
import sys
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


def inactive_notice(train_length: int, longest: Optional[int], dynamic_ntk: bool, logn: bool) -> Optional[str]:
    """One line saying that dynamic NTK / LogN, asked for, cannot change anything: both act only
    on positions past the training length, and no sequence here is longer (``longest`` None: an
    interactive chat, length unknown). None when they are off or something is longer."""
    asked = [name for name, on in (("dynamic NTK", dynamic_ntk), ("LogN", logn)) if on]
    if not asked or (longest is not None and longest > train_length):
        return None
    what = " and ".join(asked)
    if longest is None:
        return (f"note: {what} act only past the training length ({train_length} tokens); "
                "shorter conversations are unchanged")
    return (f"note: {what} change nothing here: the longest sequence ({longest} tokens) is within "
            f"the training length ({train_length} tokens)")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def requested_dtype(bf16: Optional[bool], dtype: Optional[str]) -> Optional[torch.dtype]:
    """The dtype the flags ask for: ``--dtype bf16|fp16|fp32``, or the older ``--bf16`` (bf16) /
    ``--no-bf16`` (fp32); None when neither is given (then :func:`inference_numerics` decides)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose {', '.join(DTYPES)}")
    if bf16 is not None and dtype is not None and (dtype == "bf16") != bf16:
        raise ConfigError(f"--{'' if bf16 else 'no-'}bf16 contradicts --dtype {dtype}")
    if dtype is not None:
        return DTYPES[dtype]
    return None if bf16 is None else DTYPES["bf16" if bf16 else "fp32"]


def inference_numerics(device_type: str, dtype: Optional[torch.dtype], backend: Optional[str],
                       checkpoint_backend: str, flash_available: bool,
                       head_dim: int) -> Tuple[torch.dtype, str]:
    """(dtype, attention backend) to run a checkpoint with. Pure, so the GPU case is tested on CPU.

    dtype: the one asked for, else bf16 on a GPU (a 14B model is 28 GB, not 57 GB in fp32) and
    fp32 on CPU. Backend: the one asked for, refused in one line if its kernel cannot run with that
    dtype on this device; else the checkpoint's (recipes train with flash) when it can run, else
    sdpa (same math)."""
    from megatron_qwen.model.attention import check_attention_kernel

    dtype = dtype or (torch.bfloat16 if device_type == "cuda" else torch.float32)
    if backend is not None:
        check_attention_kernel(backend, dtype, device_type, flash_available, head_dim,
                               dtype_from="--dtype / --bf16, or the default for this device")
        return dtype, backend
    try:
        check_attention_kernel(checkpoint_backend, dtype, device_type, flash_available, head_dim)
    except ConfigError:
        return dtype, "sdpa"
    return dtype, checkpoint_backend


def checkpoint_model_config(load: str) -> ModelConfig:
    """The ModelConfig stored with a megatron-core checkpoint directory."""
    from megatron_qwen.checkpoint.mcore_io import McoreCheckpointReader

    return McoreCheckpointReader(load).cfg


def load_model(
    load: str,
    parallel_cfg: Optional[ParallelConfig] = None,
    params_dtype: Optional[torch.dtype] = None,
    **model_overrides,
) -> Tuple[List[torch.nn.Module], ModelConfig]:
    """Build this rank's model chunks for the checkpoint at ``load`` and load its weights.

    Initialises torch.distributed and the model-parallel groups if nothing has (a single process
    needs no launcher). ``model_overrides`` replace ModelConfig fields that do not change the
    weights' shapes (attention_backend, use_dynamic_ntk, use_logn_attn, window_sizes, ...).
    ``params_dtype`` None and no ``attention_backend`` override: :func:`inference_numerics`
    chooses (bf16 on a GPU, fp32 on CPU; the checkpoint's backend where it can run).
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
    from megatron_qwen.model.attention import flash_attn_func

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    requested = model_overrides.pop("attention_backend", None)
    params_dtype, backend = inference_numerics(
        device_type, params_dtype, requested, model_cfg.attention_backend,
        flash_attn_func is not None, model_cfg.kv_channels)
    if requested is None and backend != model_cfg.attention_backend:
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"{load}: trained with attention_backend={model_cfg.attention_backend}, which cannot "
                  f"run in {str(params_dtype).removeprefix('torch.')} on {device_type} here; using {backend}",
                  file=sys.stderr, flush=True)
    model_cfg = dataclasses.replace(model_cfg, **model_overrides, attention_backend=backend)
    model_cfg.validate()
    if not (torch.distributed.is_initialized() and ps.model_parallel_is_initialized()):
        init_distributed(parallel_cfg, bf16=bf16)
    chunks = build_model(model_cfg, parallel_cfg, params_dtype)
    load_model_weights(chunks, load)
    for chunk in chunks:
        chunk.eval()
    return chunks, model_cfg
