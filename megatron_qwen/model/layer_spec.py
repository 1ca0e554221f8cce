"""The Qwen decoder layer as a megatron-core ModuleSpec (report section 2.3).

Pre-norm RMSNorm -> self-attention (fused QKV with bias, RoPE, no output bias) -> residual ->
RMSNorm -> SwiGLU MLP (fc1 = [gate; up], SiLU, no bias) -> residual. It is megatron-core's own
TransformerLayer / SelfAttention / MLP with three submodules swapped: our RMSNorm (sequence
parallel capable), our core attention (sdpa / flash / unfused), local (non-TE) linears."""

from __future__ import annotations

from typing import Optional

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

from megatron_qwen.model.attention import QwenCoreAttention
from megatron_qwen.model.norm import RMSNorm


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


def qwen_block_spec(config: TransformerConfig, vp_stage: Optional[int] = None) -> ModuleSpec:
    """The decoder for one pipeline (virtual) stage: its share of layers, and the final RMSNorm
    (megatron-core's default final norm is the torch one, which refuses sequence parallelism)."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    layer = qwen_layer_spec()
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=RMSNorm),
    )
