"""Packed sequences as THD (model/varlen.py): the per-document reference defines correctness.

Loss and gradients of the THD path equal those of the dense block-diagonal mask and of every
document run alone (fp32, one process; the TP=2 + sequence parallel and PP=2 layouts are in
tests/scripts/varlen_parallel.py); per-layer windows and LogN with packing; the kernels behind
the contract against the reference; the selection never hands a flash kernel fp32 or a mask."""

from pathlib import Path

import pytest
import torch

from megatron_qwen.config import ModelConfig, ParallelConfig
from megatron_qwen.model import build_model, varlen
from megatron_qwen.runtime import seed_everything
from tests.dist import run_torchrun
from tests.scripts.varlen_common import SEQ, dense_masks, documents, masked_mean, packed_batch

# fp32: the three paths sum the same products in a different order (per-document vs one masked
# softmax; RoPE at restarted vs absolute positions). Observed: loss <= 7e-8 relative, gradients
# <= 6.2e-7 of the largest gradient; the bounds are ten times that.
LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5


def model_of(cfg: ModelConfig, **overrides):
    seed_everything(3)
    (model,) = build_model(ModelConfig(**{**cfg.__dict__, **overrides}), ParallelConfig())
    return model


def thd_loss(model, batch):
    flat, packed = varlen.thd_micro_batch(batch)
    out = model(flat["tokens"], flat["position_ids"], None, labels=flat["labels"], packed_seq_params=packed)
    return masked_mean(out, flat["loss_mask"])


def dense_loss(model, batch):
    out = model(batch["tokens"], batch["position_ids"], dense_masks(batch), labels=batch["labels"])
    return masked_mean(out, batch["loss_mask"])


def separate_loss(model, batch):
    """Every document alone, causal: the sum of its masked token losses over the batch's count."""
    total = 0.0
    for row, a, b in documents(batch):
        out = model(batch["tokens"][row:row + 1, a:b], torch.arange(b - a)[None], None,
                    labels=batch["labels"][row:row + 1, a:b])
        total = total + (out.reshape(-1) * batch["loss_mask"][row, a:b]).sum()
    return total / batch["loss_mask"].sum()


def loss_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(name, got, want):
    loss_g, grads_g = got
    loss_w, grads_w = want
    assert abs(loss_g - loss_w) <= LOSS_RTOL * abs(loss_w), f"{name}: loss {loss_g} vs {loss_w}"
    scale = max(g.abs().max().item() for g in grads_w.values())
    worst = max((grads_g[n] - grads_w[n]).abs().max().item() for n in grads_w)
    assert worst <= GRAD_RTOL * scale, f"{name}: gradients differ by {worst} (largest {scale})"


def test_cu_seqlens_pack_into_one_thd_row():
    batch = packed_batch(1000)
    flat, packed = varlen.thd_micro_batch(batch)
    assert packed.qkv_format == "thd" and packed.cu_seqlens_q.dtype == torch.int32
    assert packed.cu_seqlens_q.tolist() == [0, 10, 24, 29, 41, 48]
    assert packed.max_seqlen_q == packed.max_seqlen_kv == 14
    assert flat["tokens"].shape == (1, 2 * SEQ)
    assert torch.equal(flat["position_ids"], batch["position_ids"].reshape(1, -1))  # restart per document
    assert batch["cu_seqlens"].nbytes == 2 * 4 * (SEQ + 1)  # not a [s, s] mask
    bad = dict(batch, cu_seqlens=torch.stack([varlen.padded_cu_seqlens([24], SEQ)] * 2))
    bad["cu_seqlens"][0, 1] = 30
    with pytest.raises(ValueError, match="cu_seqlens of sample 0"):
        varlen.thd_micro_batch(bad)
    with pytest.raises(ValueError, match="sum to 24"):
        varlen.padded_cu_seqlens([10, 10], SEQ)


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_thd_loss_and_grads_equal_dense_mask_and_separate_documents(world, tiny, backend):
    model = model_of(tiny, attention_backend=backend).train()
    batch = packed_batch(tiny.vocab_size)
    thd = loss_and_grads(model, thd_loss, batch)
    assert_close("THD vs dense mask", thd, loss_and_grads(model, dense_loss, batch))
    assert_close("THD vs separate documents", thd, loss_and_grads(model, separate_loss, batch))
    core = model.decoder.layers[0].self_attention.core_attention
    assert core.last_packed_kernel == "reference"  # on CPU
    # not vacuous: one row without document boundaries is a different loss
    merged = dict(batch, cu_seqlens=torch.stack([varlen.padded_cu_seqlens([SEQ], SEQ)] * 2))
    assert abs(thd_loss(model, merged).item() - thd[0]) > 1e-3


def thd_logits(model, batch):
    flat, packed = varlen.thd_micro_batch(batch)
    return model(flat["tokens"], flat["position_ids"], None, packed_seq_params=packed)[0]


def dense_logits(model, batch):
    return model(batch["tokens"], batch["position_ids"], dense_masks(batch)).flatten(0, 1)


def separate_logits(model, batch):
    return torch.cat([model(batch["tokens"][row:row + 1, a:b], torch.arange(b - a)[None], None)[0]
                      for row, a, b in documents(batch)])


def test_windows_and_logn_with_packing(world, tiny):
    """Eval (where report 2.5's windows and LogN act): per-layer windows through the THD path
    equal the dense block mask with the window and separate documents; LogN scales each query by
    its position inside its own document (documents longer than the training length of 8)."""
    batch = packed_batch(tiny.vocab_size, docs=[[11, 13], [5, 19]])
    model = model_of(tiny, seq_length=8, window_sizes=[4, 9, None, 6], use_logn_attn=True).eval()
    diff = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    with torch.no_grad():
        thd = thd_logits(model, batch)
        assert diff(thd, separate_logits(model, batch)) <= 1e-5
        model.config.use_logn_attn = False  # the dense path scales by pack position: compare without
        windowed = thd_logits(model, batch)
        assert diff(windowed, dense_logits(model, batch)) <= 1e-5
        assert diff(windowed, separate_logits(model, batch)) <= 1e-5
        model.config.window_sizes = None
        full = thd_logits(model, batch)
    assert diff(windowed, thd) > 1e-3  # LogN acted
    assert diff(full, windowed) > 1e-3  # the windows acted


def random_qkv(t, heads, groups, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, heads, dim, generator=g).to(dtype),
            torch.randn(t, groups, dim, generator=g).to(dtype), torch.randn(t, groups, dim, generator=g).to(dtype))


@pytest.mark.parametrize("window", [None, 3])
def test_kernels_equal_the_reference(window):
    """dense (block mask built from cu_seqlens) and FlexAttention (eager on CPU, forward only:
    it has no CPU backward) against the per-document reference, with GQA."""
    q, k, v = random_qkv(30, 4, 2, 8)
    cu = torch.tensor([0, 7, 8, 21, 30], dtype=torch.int32)
    want = varlen.reference(q, k, v, cu, 0.3, window)
    assert (varlen.dense(q, k, v, cu, 0.3, window) - want).abs().max().item() <= 1e-6
    if varlen.flex_attention is not None:
        assert (varlen.flex(q, k, v, cu, 0.3, window) - want).abs().max().item() <= 1e-5
    # the reference is each document alone
    alone = varlen.reference(q[8:21], k[8:21], v[8:21], torch.tensor([0, 13]), 0.3, window)
    assert torch.equal(want[8:21], alone)


@pytest.mark.parametrize("device, dtype, head_dim, dropout, flash, flex, want", [
    ("cpu", torch.bfloat16, 64, 0.0, True, True, "reference"),
    ("cuda", torch.bfloat16, 64, 0.1, True, True, "flash"),
    ("cuda", torch.float16, 256, 0.0, True, True, "flash"),
    ("cuda", torch.float32, 64, 0.0, True, True, "flex"),     # flash refuses fp32
    ("cuda", torch.bfloat16, 512, 0.0, True, True, "flex"),   # ... and head dims > 256
    ("cuda", torch.bfloat16, 64, 0.0, False, True, "flex"),   # flash-attn not installed
    ("cuda", torch.bfloat16, 64, 0.1, False, True, "dense"),  # flex has no dropout
    ("cuda", torch.float32, 64, 0.0, True, False, "dense"),
])
def test_selection(device, dtype, head_dim, dropout, flash, flex, want):
    assert varlen.select_kernel("sdpa", device, dtype, head_dim, dropout, flash, flex)[0] == want
    assert varlen.select_kernel("unfused", device, dtype, head_dim, dropout, flash, flex)[0] == "reference"


class FlashRecorder:
    """Stands in for flash_attn_varlen_func on CPU: asserts what flash-attn itself refuses on a
    GPU (fp32, a mask argument, non-int32 offsets), then answers with the reference."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, softmax_scale, causal, window_size):
        for x in (q, k, v):
            assert x.dtype in (torch.float16, torch.bfloat16), x.dtype
            assert x.dim() == 3 and x.stride(-1) == 1  # flash-attn needs the last dim contiguous
        assert cu_q.dtype == cu_k.dtype == torch.int32 and causal
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
        self.calls.append(window_size)
        window = None if window_size[0] < 0 else window_size[0] + 1
        out = varlen.reference(q.float(), k.float(), v.float(), cu_q, softmax_scale, window)
        return out.to(q.dtype)


def test_selected_flash_gets_half_precision_and_no_mask(world, tiny, monkeypatch):
    """The GPU class of failure on CPU: the model's THD forward as on a CUDA machine with
    flash-attn. bf16 goes to flash (with each layer's window), fp32 never does."""
    recorder = FlashRecorder()
    select = varlen.select_kernel
    monkeypatch.setattr(varlen, "flash_attn_varlen_func", recorder)
    monkeypatch.setattr(varlen, "select_kernel", lambda backend, device, *a, **kw: select(backend, "cuda", *a, **kw))
    monkeypatch.setattr(varlen, "flex_attention", None)  # fp32 then takes the dense fallback
    batch = packed_batch(tiny.vocab_size)
    flat, packed = varlen.thd_micro_batch(batch)
    model = model_of(tiny, window_sizes=[4, None, 6, 5]).eval()
    core = model.decoder.layers[0].self_attention.core_attention
    with torch.no_grad():
        want = model(flat["tokens"], flat["position_ids"], None, packed_seq_params=packed)
        assert core.last_packed_kernel == "dense" and not recorder.calls
        model.bfloat16()
        got = model(flat["tokens"], flat["position_ids"], None, packed_seq_params=packed)
    assert core.last_packed_kernel == "flash"
    assert recorder.calls == [(3, 0), (-1, 0), (5, 0), (4, 0)]
    assert (got.float() - want).abs().max().item() < 0.1 * want.abs().max().item()  # bf16 vs fp32
    with pytest.raises(ValueError, match="fp16/bf16"):
        varlen.flash(*random_qkv(8, 2, 2, 4), torch.tensor([0, 8], dtype=torch.int32), 0.5)


def test_thd_refuses_a_mask_alongside_cu_seqlens(world, tiny):
    model = model_of(tiny)
    flat, packed = varlen.thd_micro_batch(packed_batch(tiny.vocab_size))
    with pytest.raises(ValueError, match="attention_mask=None"):
        model(flat["tokens"], flat["position_ids"], torch.zeros(1, 1, 48, 48, dtype=torch.bool),
              packed_seq_params=packed)


@pytest.mark.timeout(300)
def test_thd_on_two_processes_tp2_sp_and_pp2():
    out = run_torchrun(Path(__file__).parent / "scripts" / "varlen_parallel.py", "tp2_sp", "pp2")
    for layout in ("tp2_sp", "pp2"):
        assert f"OK {layout} " in out, out[-3000:]
