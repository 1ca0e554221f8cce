"""Long context at inference (report 2.5): dynamic NTK, LogN and layer-wise windows in the
megatron-core model, against the released Qwen rule (hand-computed numbers) and against
transformers' Qwen2ForCausalLM configured to compute the same thing."""

import math

import pytest
import torch

from megatron_qwen.config import ModelConfig, ParallelConfig
from megatron_qwen.inference.loading import LongContext, set_long_context
from megatron_qwen.model import build_model
from megatron_qwen.model.long_context import (
    QwenRotaryEmbedding,
    logn_factors,
    ntk_alpha,
    ntk_base,
    window_mask,
    window_sizes_from_rule,
)
from tests.scripts.model_common import full_mcore_state, hf_reference, load_into_chunks

TOL = 1e-4


# --------------------------------------------------------------------------- the released rule


@pytest.mark.parametrize("length, alpha, base", [
    (1000, 1, 10000.0),       # shorter than training: alpha clamps to 1
    (2048, 1, 10000.0),       # the training length itself
    (3000, 3, 30527.7367),    # anything in (1x, 2x] -> 2^2 - 1
    (4096, 3, 30527.7367),    # 2x
    (8192, 7, 72195.8601),    # 4x
    (16384, 15, 156588.3235),  # 8x
])
def test_ntk_alpha_and_base_follow_the_released_qwen_rule(length, alpha, base):
    """Qwen-7B: L_train 2048, head dim 128; base' = 10000 * alpha^(128/126), by hand:
    3^(128/126) = 3.05277, 7^(128/126) = 7.21959, 15^(128/126) = 15.65883."""
    assert ntk_alpha(length, 2048) == alpha
    assert ntk_base(10000.0, 128, ntk_alpha(length, 2048)) == pytest.approx(base, rel=1e-8)


def test_rotary_inverse_frequencies_use_the_ntk_base(world):
    config = transformer_config_stub(seq=2048)
    rope = QwenRotaryEmbedding(config, kv_channels=128, rotary_base=10000.0, use_cpu_initialization=True)
    rope.eval()
    want = 1.0 / (30527.7367488067 ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.allclose(rope.inv_freq_for(3), want, rtol=1e-6)
    assert rope.inv_freq.dtype == torch.float32
    # the table at 4096 positions uses alpha 3; at 2048 the plain base; training mode: always plain
    emb = rope(4096)
    assert torch.allclose(emb[4095, 0, 0, :64], 4095 * want, rtol=1e-5)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.allclose(rope(2048)[2047, 0, 0, :64], 2047 * plain, rtol=1e-5)
    rope.train()
    assert torch.allclose(rope(4096)[4095, 0, 0, :64], 4095 * plain, rtol=1e-5)


def transformer_config_stub(seq: int):
    class Stub:
        use_dynamic_ntk = True
        training_seq_length = seq
    return Stub()


def test_logn_factors_hand_computed():
    """log_{2048}(p + 1) past the training length: log(4096)/log(2048) = 12/11, 16384 -> 14/11."""
    f = logn_factors(2046, 2050, 2048)  # positions 2046..2049 -> lengths 2047..2050
    assert f.tolist()[:2] == [1.0, 1.0]
    assert f[2].item() == pytest.approx(math.log(2049) / math.log(2048), rel=1e-7)
    assert f[2].item() == pytest.approx(1.0000640, rel=1e-6)
    assert logn_factors(4095, 4096, 2048).item() == pytest.approx(12 / 11, rel=1e-7)
    assert logn_factors(16383, 16384, 2048).item() == pytest.approx(14 / 11, rel=1e-7)


def test_window_rules_and_mask():
    assert window_sizes_from_rule("none", 4, 64) is None
    assert window_sizes_from_rule("uniform:32", 3, 64) == [32, 32, 32]
    assert window_sizes_from_rule("linear:16", 4, 64) == [16, 32, 48, 64]
    assert window_sizes_from_rule("linear:16:full", 4, 64) == [16, 40, 64, None]
    assert window_sizes_from_rule("list:8,full,16", 3, 64) == [8, None, 16]
    for bad in ("linear:64:16", "uniform:0", "list:1,2", "banana", "uniform:x"):
        with pytest.raises(ValueError, match="--window-rule"):
            window_sizes_from_rule(bad, 3, 64)
    # query at absolute position p sees keys p - w < k <= p
    m = window_mask(2, 6, 3)
    assert (~m).int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


# --------------------------------------------------------------------------- in the model


@pytest.fixture(scope="module")
def hf(tiny):
    return hf_reference(tiny, seed=0)


def ours(model_cfg, hf_model, **overrides):
    cfg = ModelConfig(**{**model_cfg.__dict__, **overrides})
    (model,) = build_model(cfg, ParallelConfig())
    load_into_chunks([model], full_mcore_state(hf_model, cfg, 1), cfg, ParallelConfig())
    return model.eval()


def hf_variant(hf_model, **config_changes):
    """The same weights in a Qwen2ForCausalLM whose config differs (base, sliding windows)."""
    from transformers import Qwen2ForCausalLM

    config = hf_model.config.__class__(**{**hf_model.config.to_dict(), **config_changes})
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config).float().eval()
    model.load_state_dict(hf_model.state_dict())
    return model


def run(model, tokens):
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def tokens_of(n, seed=0, batch=2):
    return torch.randint(0, 1000, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_dynamic_ntk_equals_qwen2_with_the_ntk_base(world, tiny, hf, backend):
    """At 2x the training length (alpha 3) our model equals Qwen2 with rope_theta = base';
    at the training length dynamic NTK changes nothing."""
    model = ours(tiny, hf, attention_backend=backend)
    set_long_context([model], LongContext(dynamic_ntk=True))
    x = tokens_of(2 * tiny.seq_length)
    theta = ntk_base(tiny.rotary_base, tiny.kv_channels, 3)
    want = hf_variant(hf, rope_parameters={"rope_type": "default", "rope_theta": theta})(x).logits
    assert (run(model, x) - want).abs().max().item() <= TOL
    short = x[:, : tiny.seq_length]
    with torch.no_grad():
        assert (run(model, short) - hf(short).logits).abs().max().item() <= TOL
    set_long_context([model], LongContext())
    assert (run(model, x) - want).abs().max().item() > 10 * TOL  # it was the NTK base that matched


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_logn_equals_qwen2_with_scaled_queries(world, tiny, hf, backend):
    """LogN scales each query by log_{L_train}(p + 1) past the training length. RoPE is a
    rotation, so scaling Qwen2's q_proj output per position is the same reference."""
    model = ours(tiny, hf, attention_backend=backend)
    set_long_context([model], LongContext(logn=True))
    x = tokens_of(3 * tiny.seq_length)
    factors = logn_factors(0, x.size(1), tiny.seq_length)
    assert factors[-1] > 1.2
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: o * factors[None, :, None])
             for layer in hf.model.layers]
    try:
        with torch.no_grad():
            want = hf(x).logits
    finally:
        for h in hooks:
            h.remove()
    got = run(model, x)
    err = (got - want).abs().max().item()
    assert err <= TOL
    with torch.no_grad():
        plain = hf(x).logits
    # positions up to the training length are untouched, later ones are not (a random model's
    # attention is flat, so the effect is small, but far above the reference's error)
    assert (got[:, : tiny.seq_length] - plain[:, : tiny.seq_length]).abs().max().item() <= TOL
    moved = (got[:, tiny.seq_length + 8:] - plain[:, tiny.seq_length + 8:]).abs().max().item()
    assert moved > 2 * TOL and moved > 20 * err


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_layer_windows_equal_qwen2_sliding_window(world, tiny, hf, backend):
    """Windows on layers 2 and 4 (1-based) equal Qwen2's sliding-window layers; windows are
    off in training mode."""
    w = 16
    model = ours(tiny, hf, attention_backend=backend)
    set_long_context([model], LongContext(window_rule=f"list:full,{w},full,{w}"))
    x = tokens_of(80)
    ref = hf_variant(hf, use_sliding_window=True, sliding_window=w,
                     layer_types=["full_attention", "sliding_attention"] * 2)
    with torch.no_grad():
        want = ref(x).logits
        plain = hf(x).logits
    got = run(model, x)
    assert (got - want).abs().max().item() <= TOL
    assert (got - plain).abs().max().item() > 1e-3
    model.train()
    assert (run(model, x) - plain).abs().max().item() <= TOL


def test_report_table3_effect_in_small(tmp_path):
    """Table 3 in small, by bench/long_context_table.py: a tiny Qwen trained on CPython's sources
    at 64 tokens (800 steps, ~80 s), read at 1x-8x that length on held-out files. Plain RoPE's
    perplexity climbs beyond the training length; NTK + LogN + windows bring it back down.
    (The full-size run, 128 tokens and 6,000 steps, is in docs/benchmarks.md.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "bench" / "long_context_table.py"), "--steps", "800",
           "--seq-length", "64", "--batch", "16", "--vocab", "1024", "--lr", "3e-3", "--num-heads", "2",
           "--corpus-mb", "6", "--window-rules", "uniform:64", "--num-samples", "16", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "table.json").read_text())
    rows = {label: {int(n): ppl for n, ppl in row.items()} for label, row in result["rows"].items()}
    plain, full = rows["plain RoPE"], rows["+ dynamic_ntk + logn + window_attn (uniform:64)"]
    assert result["final_loss"] < 3.5  # it learned the code (unigram loss is ~5.5)
    # seen: plain 14.37 -> 15.68 -> 18.34 -> 21.12 at 1x, 2x, 4x, 8x (final loss 1.95)
    assert plain[512] > 1.25 * plain[64] and plain[512] > plain[256] > plain[128]
    # seen: 18.86 at 8x, 10.7% below plain; every row is the same model at its training length
    assert full[512] < 0.95 * plain[512] and full[256] < plain[256]
    assert all(row[64] == pytest.approx(plain[64], rel=1e-6) for row in rows.values())
    # and plain RoPE is transformers' Qwen2ForCausalLM on the same weights at every length
    assert rows["transformers plain"][512] == pytest.approx(plain[512], rel=1e-4)
