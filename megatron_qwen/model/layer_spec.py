"""The Qwen decoder layer as a megatron-core ModuleSpec (report section 2.3), in one of two
implementations (Megatron-LM's ``--transformer-impl``):

- ``local``: megatron-core's own TransformerLayer / SelfAttention / MLP with three submodules
  swapped: our RMSNorm (sequence parallel capable), our core attention (sdpa / flash / unfused,
  with LogN and per-layer windows), local (non-TE) linears. Runs anywhere.
- ``transformer_engine``: megatron-core's own ``get_gpt_layer_with_transformer_engine_spec``,
  unchanged, configured for Qwen through the TransformerConfig (normalization="RMSNorm", SwiGLU,
  QKV bias; the untied head is GPTModel's). TE fuses each RMSNorm into the next linear and
  brings its own attention (flash / cuDNN fused), FP8 and TP communication overlap.
  Unverified on GPU: no run of this project has had Transformer Engine installed.

Pre-norm RMSNorm -> self-attention (fused QKV with bias, RoPE, no output bias) -> residual ->
RMSNorm -> SwiGLU MLP (fc1 = [gate; up], SiLU, no bias) -> residual, in both. Which one a run
uses is decided by :func:`choose_transformer_impl` (docs/model.md, "Transformer Engine")."""

from __future__ import annotations

import functools
from typing import List, Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_qwen.config import ConfigError, ModelConfig, ParallelConfig
from megatron_qwen.model.attention import QwenCoreAttention
from megatron_qwen.model.norm import RMSNorm

TE_INSTALL = "pip install --no-build-isolation -e '.[gpu]' (transformer-engine[pytorch]>=2.9,<2.12)"


@functools.lru_cache(maxsize=None)
def te_importable() -> bool:
    """Transformer Engine and megatron-core's wrappers of it import (they need CUDA)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or TE's own errors when CUDA libraries are missing
        return False
    return True


def needs_transformer_engine(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> List[str]:
    """The settings of this run that only the Transformer Engine layers implement."""
    out = []
    if model_cfg.fp8_format is not None:
        out.append(f"model.fp8_format={model_cfg.fp8_format}")
    if parallel_cfg.tp_comm_overlap:
        out.append("parallel.tp_comm_overlap=true")
    if parallel_cfg.context_parallel_size > 1:
        out.append(f"parallel.context_parallel_size={parallel_cfg.context_parallel_size}")
    return out


def local_only(model_cfg: ModelConfig, mask_from: Optional[str] = None) -> List[str]:
    """The settings only our local core attention implements: LogN scaling and per-layer
    windows (report 2.5, inference) live in QwenCoreAttention; an explicit attention mask (SFT's
    block-diagonal packing) would be dropped by TE's causal attention."""
    out = []
    if model_cfg.use_logn_attn:
        out.append("model.use_logn_attn=true (LogN scaling is in the local core attention)")
    if model_cfg.window_sizes and any(w is not None for w in model_cfg.window_sizes):
        out.append("model.window_sizes (per-layer windows are in the local core attention)")
    if mask_from:
        out.append(f"{mask_from} (an explicit attention mask; TE's causal attention ignores it)")
    return out


def choose_transformer_impl(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, on_gpu: bool,
                            te_available: bool, mask_from: Optional[str] = None) -> str:
    """``transformer_engine`` or ``local`` for this run, or a one-line ConfigError.

    ``model.transformer_impl`` unset (auto): Transformer Engine when it is importable on a GPU
    and nothing of the run needs the local core attention, else local. Pure (the machine is in
    the arguments), so the GPU cases are tested on CPU."""
    requested = model_cfg.transformer_impl
    te_only, local = needs_transformer_engine(model_cfg, parallel_cfg), local_only(model_cfg, mask_from)
    te_here = on_gpu and te_available
    if requested is None:
        if te_only:
            requested = "transformer_engine"  # and the checks below say why it cannot be
        else:
            return "transformer_engine" if te_here and not local else "local"
    if requested == "local":
        if te_only:
            raise ConfigError(f"{te_only[0]} needs Transformer Engine layers and this run asks for "
                              "model.transformer_impl=local; use --transformer-impl transformer_engine")
        return "local"
    who = (f"{te_only[0]} needs Transformer Engine" if model_cfg.transformer_impl is None
           else "model.transformer_impl=transformer_engine")
    if not te_available:
        raise ConfigError(f"{who}, which does not import here ({TE_INSTALL}); "
                          "or use --transformer-impl local")
    if not on_gpu:
        raise ConfigError(f"{who}, which runs on CUDA GPUs only and this run is on CPU; "
                          "use --transformer-impl local")
    if local:
        raise ConfigError(f"{who}, which does not support {local[0]}; use --transformer-impl local")
    return "transformer_engine"


def qwen_layer_spec() -> ModuleSpec:
    """One Qwen decoder layer, with megatron-core's standard submodule names."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=QwenCoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def qwen_te_layer_spec() -> ModuleSpec:
    """One Qwen decoder layer from Transformer Engine modules: megatron-core's own spec (the norms
    fused into linear_qkv / linear_fc1 as ``layer_norm_weight``). Needs TE importable."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(num_experts=None, qk_layernorm=False)


def qwen_block_spec(config: TransformerConfig, vp_stage: Optional[int] = None) -> ModuleSpec:
    """The decoder for one pipeline (virtual) stage: its share of layers, and the final RMSNorm
    (megatron-core's default final norm is the torch one, which refuses sequence parallelism;
    with TE it is TE's RMSNorm, as megatron-core's TE block spec has it)."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    if config.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        layer, final_norm = qwen_te_layer_spec(), TENorm
    else:
        layer, final_norm = qwen_layer_spec(), RMSNorm
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm),
    )


def initialize_tp_comm_overlap(model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
                               micro_batch_size: int, dtype) -> None:
    """TE's userbuffers for ``tp_comm_overlap``: one [s * b / cp, h] communication buffer per TP
    group, created once before the model's first forward (as Megatron-LM's
    ``_initialize_tp_communicators``). Unverified on GPU."""
    from transformer_engine.pytorch.module import base as te_base

    shape = [model_cfg.seq_length * micro_batch_size // parallel_cfg.context_parallel_size,
             model_cfg.hidden_size]
    te_base.initialize_ub(shape=shape, tp_size=parallel_cfg.tensor_model_parallel_size,
                          use_fp8=model_cfg.fp8_format is not None, dtype=dtype)
