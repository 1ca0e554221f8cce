"""megatron-core's fusion flags are decided in one place (model/fusions.py): on only where their
kernel exists. Only the availability probes are faked here (CUDA, an import, megatron-core's fused
RoPE lookup); the TransformerConfig checks and the model are megatron-core's own."""

import itertools

import pytest
import torch

from megatron_qwen.config import ConfigError, ParallelConfig, load_model_config
from megatron_qwen.model import build_model, fusions, transformer_config
from megatron_qwen.runtime import destroy, init_distributed

KERNEL_OF = {  # what each flag needs besides CUDA (persist_layer_norm: never, the model uses RMSNorm)
    "bias_activation_fusion": fusions.TRITON_MODULE,
    "bias_dropout_fusion": fusions.TRITON_MODULE,
    "masked_softmax_fusion": fusions.SOFTMAX_MODULE,
    "gradient_accumulation_fusion": fusions.GRAD_ACCUM_MODULE,
    "apply_rope_fusion": "fused_rope",
}


def fake_gpu(monkeypatch, present):
    """A CUDA device with exactly the kernels in ``present`` (module names, or "fused_rope")."""
    monkeypatch.setattr(fusions, "cuda_available", lambda: True)
    monkeypatch.setattr(fusions, "importable", lambda module: module in present)
    monkeypatch.setattr(fusions, "fused_rope_available", lambda: "fused_rope" in present)


def test_on_cpu_every_flag_is_off_with_its_reason():
    decided = fusions.decide_fusions()
    assert set(decided) == set(fusions.FLAGS)
    assert all(not f.on and f.reason == "no CUDA device" for f in decided.values())
    cfg = transformer_config(load_model_config("tiny_vocab"), ParallelConfig())
    assert not any(getattr(cfg, flag) for flag in fusions.FLAGS)
    assert fusions.describe(decided).count("=off (no CUDA device)") == len(fusions.FLAGS)


KERNELS = sorted(set(KERNEL_OF.values()))


@pytest.mark.parametrize("present", [set(c) for n in range(len(KERNELS) + 1)
                                     for c in itertools.combinations(KERNELS, n)], ids=str)
def test_on_a_gpu_exactly_the_flags_whose_kernel_is_present_are_on(monkeypatch, present):
    fake_gpu(monkeypatch, present)
    decided = fusions.decide_fusions()
    on = {flag for flag, f in decided.items() if f.on}
    assert on == {flag for flag, kernel in KERNEL_OF.items() if kernel in present}
    for flag in set(fusions.FLAGS) - on:  # every off flag says which kernel is missing
        assert flag == "persist_layer_norm" or KERNEL_OF[flag].replace("fused_rope", "RoPE") in decided[flag].reason


def test_a_flag_is_never_on_for_a_kernel_that_does_not_import(monkeypatch):
    """The GPU class of bug: a fusion on whose kernel is missing fails only on the GPU machine.
    With CUDA faked but the real import probes, a flag may be on only if its module imports."""
    monkeypatch.setattr(fusions, "cuda_available", lambda: True)
    for flag, f in fusions.decide_fusions().items():
        if f.on:
            kernel = KERNEL_OF[flag]
            if kernel == "fused_rope":
                from megatron.core.models.common.embeddings import rope_utils
                assert rope_utils.fused_apply_rotary_pos_emb is not None
            else:
                __import__(kernel)
    # a name that does not import is never "present", whatever find_spec would say
    assert not fusions.importable("megatron_qwen_no_such_kernel")


def test_transformer_config_takes_the_decision_and_refuses_a_flag_without_its_kernel(monkeypatch):
    tiny = load_model_config("tiny_vocab")
    with pytest.raises(ConfigError, match=r"gradient_accumulation_fusion=True was asked for, but no CUDA"):
        transformer_config(tiny, ParallelConfig(), gradient_accumulation_fusion=True)
    # a faked GPU with the Apex extensions and Triton, no TE: megatron-core's own config accepts it
    fake_gpu(monkeypatch, {fusions.TRITON_MODULE, fusions.SOFTMAX_MODULE, fusions.GRAD_ACCUM_MODULE})
    cfg = transformer_config(tiny, ParallelConfig(), use_cpu_initialization=True)
    assert (cfg.bias_activation_fusion, cfg.bias_dropout_fusion, cfg.masked_softmax_fusion,
            cfg.gradient_accumulation_fusion) == (True, True, True, True)
    assert not cfg.apply_rope_fusion and not cfg.persist_layer_norm
    with pytest.raises(ConfigError, match="apply_rope_fusion=True was asked for, but megatron-core found no fused RoPE"):
        transformer_config(tiny, ParallelConfig(), apply_rope_fusion=True)


def test_a_model_built_with_the_decided_flags_trains_a_step_on_cpu():
    init_distributed(ParallelConfig(), seed=1)
    try:
        tiny = load_model_config("tiny_vocab")
        (model,) = build_model(tiny, ParallelConfig())
        tokens = torch.randint(0, tiny.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(16).expand_as(tokens)
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        destroy()
