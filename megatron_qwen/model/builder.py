"""Build the Qwen model (megatron-core GPTModel chunks) from ModelConfig + ParallelConfig."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from megatron_qwen.config import ConfigError, ModelConfig, ParallelConfig
from megatron_qwen.model.attention import flash_attn_func
from megatron_qwen.model.fusions import FLAGS, decide_fusions, log_once
from megatron_qwen.model.transformer_config import QwenTransformerConfig


def check_layout(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> None:
    """Every reason a model/layout pair cannot run, as a one-line ConfigError, before building."""
    model_cfg.validate()
    parallel_cfg.validate()
    parallel_cfg.check_model(model_cfg)
    tp = parallel_cfg.tensor_model_parallel_size
    padded = model_cfg.vocab_size_padded(tp)
    if padded % tp:
        raise ConfigError(f"tensor_model_parallel_size={tp} does not divide the padded vocabulary {padded}")
    if padded < model_cfg.vocab_size:
        raise ConfigError(f"model.padded_vocab_size={padded} is smaller than model.vocab_size={model_cfg.vocab_size}")
    if model_cfg.attention_backend == "flash" and flash_attn_func is None:
        raise ConfigError("model.attention_backend=flash needs the flash_attn package (pip install flash-attn)")


def transformer_config(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
) -> QwenTransformerConfig:
    """The megatron-core TransformerConfig of a Qwen model (report 2.3): RMSNorm eps 1e-6, SwiGLU,
    QKV bias only, RoPE over the whole head dim. Each fusion flag is on only where its kernel
    exists (``model.fusions.decide_fusions``); an override that turns one on without it is refused.
    ``transformer_impl`` is the layer implementation chosen by model/layer_spec.py."""
    from megatron_qwen.model.layer_spec import choose_transformer_impl, te_importable

    check_layout(model_cfg, parallel_cfg)
    on_gpu = torch.cuda.is_available()
    impl = choose_transformer_impl(model_cfg, parallel_cfg, on_gpu, te_importable())
    fusions = decide_fusions(normalization="RMSNorm")
    log_once(fusions)
    vpp = parallel_cfg.virtual_pipeline_model_parallel_size
    recompute = model_cfg.recompute_granularity
    kwargs = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        kv_channels=model_cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Kernels: each fusion on only where its kernel exists here (model/fusions.py)
        **{flag: f.on for flag, f in fusions.items()},
        # On CPU every tensor is created in host memory; the full-weight CPU init also makes the
        # initial weights independent of the TP layout.
        use_cpu_initialization=not on_gpu,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=model_cfg.recompute_num_layers if recompute == "full" else None,
        qwen_attention_backend=model_cfg.attention_backend,
        training_seq_length=model_cfg.seq_length,
        use_dynamic_ntk=model_cfg.use_dynamic_ntk,
        use_logn_attn=model_cfg.use_logn_attn,
        window_sizes=model_cfg.window_sizes,
        transformer_impl=impl,
        fp8=model_cfg.fp8_format,
        tp_comm_overlap=parallel_cfg.tp_comm_overlap,
        context_parallel_size=parallel_cfg.context_parallel_size,
    )
    for flag in FLAGS:
        if overrides.get(flag) and not fusions[flag].on:
            raise ConfigError(f"{flag}=True was asked for, but {fusions[flag].reason}")
    kwargs.update(overrides)
    return QwenTransformerConfig(**kwargs)


def _check_parallel_state(parallel_cfg: ParallelConfig) -> None:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise ConfigError("build_model needs megatron_qwen.runtime.init_distributed(parallel_cfg) first")
    got = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    want = (parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size)
    if got != want:
        raise ConfigError(f"parallel config asks for TP x PP = {want} but the process groups are {got}")


def build_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    params_dtype: torch.dtype = torch.float32,
    config: Optional[QwenTransformerConfig] = None,
) -> List["GPTModel"]:  # noqa: F821
    """The GPTModel chunks of this pipeline rank, one per virtual stage (a list of one without
    interleaving). Parameter names are megatron-core's (decoder.layers.N.self_attention.linear_qkv...).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from megatron_qwen.model.layer_spec import qwen_block_spec
    from megatron_qwen.model.long_context import QwenRotaryEmbedding

    config = config or transformer_config(model_cfg, parallel_cfg, params_dtype)
    _check_parallel_state(parallel_cfg)
    vocab = model_cfg.vocab_size_padded(parallel_cfg.tensor_model_parallel_size)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=qwen_block_spec(config, vp_stage=stage),
                vocab_size=vocab,
                max_sequence_length=model_cfg.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                parallel_output=True,
                share_embeddings_and_output_weights=False,
                position_embedding_type="rope",
                rotary_percent=1.0,
                rotary_base=int(model_cfg.rotary_base),
                vp_stage=stage,
            )
        )
        # RoPE with the dynamic NTK base of report 2.5 (identical to megatron-core's when off)
        chunks[-1].rotary_pos_emb = QwenRotaryEmbedding(
            config, kv_channels=config.kv_channels, rotary_base=model_cfg.rotary_base,
            use_cpu_initialization=config.use_cpu_initialization)
    return chunks


def count_parameters(model_cfg: ModelConfig) -> int:
    """Parameters of the whole model with the released (TP=1) vocabulary padding, counted on the
    meta device (nothing is allocated, so it works for 14B on a laptop).

    Without torch.distributed it builds in a throwaway world of one. Inside a distributed run it
    counts this rank's chunks and sums over the model-parallel group, so every rank of that
    group must call it."""
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized():
        from megatron_qwen.runtime.distributed import world_of_one

        with world_of_one(model_parallel=True):
            return count_parameters(model_cfg)
    tp = ps.get_tensor_model_parallel_world_size()
    parallel_cfg = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
    )
    # Initialisation runs on meta tensors (free) and is what marks the TP-split parameters.
    config = transformer_config(model_cfg, parallel_cfg, use_cpu_initialization=True)
    with torch.device("meta"):
        chunks = build_model(model_cfg, parallel_cfg, config=config)
    # TP-split tensors count on every TP rank, replicated ones (the norms) on TP rank 0 only.
    first_tp = ps.get_tensor_model_parallel_rank() == 0
    local = sum(p.numel() for chunk in chunks for p in chunk.parameters()
                if first_tp or getattr(p, "tensor_model_parallel", False))
    if tp > 1 or parallel_cfg.pipeline_model_parallel_size > 1:
        from megatron_qwen.runtime import device
        from megatron_qwen.runtime.collectives import all_reduce_scalars

        local = int(all_reduce_scalars([local], device=device(), group=ps.get_model_parallel_group())[0])
    # The embedding and the output layer are padded to a multiple of 128 x TP: report TP=1's.
    extra_rows = model_cfg.vocab_size_padded(tp) - model_cfg.vocab_size_padded(1)
    return local - 2 * extra_rows * model_cfg.hidden_size
