"""Shared by the model tests: a tiny random transformers Qwen2ForCausalLM (the reference) and
loading its weights into our megatron-core chunks through the converter's one mapping."""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_qwen.checkpoint import hf_to_mcore_state_dict, local_state_dict
from megatron_qwen.config import ModelConfig, ParallelConfig


def hf_reference(model_cfg: ModelConfig, seed: int = 0, vocab_rows: Optional[int] = None):
    """Qwen2ForCausalLM with the model's shape and random weights (biases too), fp32, eager."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_rows or model_cfg.vocab_size_padded(1),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups or model_cfg.num_attention_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rms_norm_eps=model_cfg.norm_epsilon,
        rope_theta=model_cfg.rotary_base,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        torch_dtype="float32",
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():  # random norms and biases, so a layout mix-up cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def full_mcore_state(hf_model, model_cfg: ModelConfig, tp: int):
    return hf_to_mcore_state_dict(hf_model.state_dict(), model_cfg, fmt="qwen2",
                                  padded_vocab=model_cfg.vocab_size_padded(tp))


def local_shards(full_state, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, vp_stage: int = 0):
    """This rank's slice of a full megatron-core state dict for one (virtual) pipeline chunk."""
    from megatron.core import parallel_state as ps

    vpp = parallel_cfg.virtual_pipeline_model_parallel_size
    return local_state_dict(
        full_state, model_cfg.num_layers,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        vpp_size=vpp if vpp and vpp > 1 else None, vp_stage=vp_stage,
    )


def load_into_chunks(chunks: List[torch.nn.Module], full_state, model_cfg: ModelConfig,
                     parallel_cfg: ParallelConfig) -> None:
    """Copy this rank's shards of a full megatron-core state dict into its chunks (strict)."""
    for vp_stage, chunk in enumerate(chunks):
        local = local_shards(full_state, model_cfg, parallel_cfg, vp_stage)
        params = dict(chunk.named_parameters())
        assert set(params) == set(local), (sorted(set(params) ^ set(local)))
        with torch.no_grad():
            for name, p in params.items():
                assert p.shape == local[name].shape, (name, p.shape, local[name].shape)
                p.copy_(local[name])


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module
