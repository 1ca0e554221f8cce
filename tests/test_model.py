"""The Qwen model on megatron-core, in one process (TP=1), against transformers' Qwen2ForCausalLM.

The parallel layouts (TP=2, PP=2, DP=2 + distributed optimizer) are in test_model_parallel.py."""

import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_qwen.config import ConfigError, ModelConfig, ParallelConfig, load_model_config
from megatron_qwen.model import build_model, check_layout, count_parameters, transformer_config
from tests.scripts.model_common import full_mcore_state, hf_reference, load_into_chunks

TOL = 1e-4  # max abs logit difference in fp32


@pytest.fixture(scope="module")
def hf(tiny):
    return hf_reference(tiny, seed=0)


def test_grouped_query_attention_matches(world, tiny):
    """Qwen-1 is multi-head; the Qwen2 layout also allows fewer K/V groups (fused per group)."""
    cfg = ModelConfig(**{**tiny.__dict__, "num_query_groups": 2})
    hf_gqa = hf_reference(cfg, seed=3)
    tokens = torch.randint(0, tiny.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf_gqa(tokens).logits
    for backend in ("sdpa", "unfused"):
        got = logits(ours(cfg, hf_gqa, attention_backend=backend), tokens)
        assert (got - want).abs().max().item() <= TOL


def ours(model_cfg, hf_model, **overrides):
    cfg = ModelConfig(**{**model_cfg.__dict__, **overrides})
    parallel = ParallelConfig()
    (model,) = build_model(cfg, parallel)
    load_into_chunks([model], full_mcore_state(hf_model, cfg, 1), cfg, parallel)
    return model.eval()


def logits(model, tokens, attention_mask=None):
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, attention_mask)


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_logits_match_qwen2_for_causal_lm(world, tiny, hf, backend):
    model = ours(tiny, hf, attention_backend=backend)
    tokens = torch.randint(0, tiny.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(tokens).logits
    got = logits(model, tokens)
    assert got.shape == want.shape
    assert want.abs().max() > 0.1  # not a degenerate comparison
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_block_diagonal_mask_equals_separate_sequences(world, tiny, hf, backend):
    """Packed SFT: two documents in one row with a block-diagonal causal mask give each
    document the logits it has alone (RoPE is relative, so the offset does not matter)."""
    model = ours(tiny, hf, attention_backend=backend)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, tiny.vocab_size, (1, 10), generator=g), torch.randint(0, tiny.vocab_size, (1, 14), generator=g)
    packed = torch.cat([a, b], dim=1)
    s = packed.size(1)
    allowed = torch.zeros(s, s, dtype=torch.bool)
    allowed[:10, :10] = True
    allowed[10:, 10:] = True
    allowed &= torch.ones(s, s, dtype=torch.bool).tril()
    mask = (~allowed)[None, None]  # megatron convention: True = masked out
    got = logits(model, packed, mask)
    with torch.no_grad():
        want_a, want_b = hf(a).logits, hf(b).logits
    assert (got[:, :10] - want_a).abs().max().item() <= TOL
    assert (got[:, 10:] - want_b).abs().max().item() <= TOL
    # and without the mask the second document does see the first
    assert (logits(model, packed)[:, 10:] - want_b).abs().max().item() > 1e-2


def test_non_boolean_mask_is_refused(world, tiny, hf):
    model = ours(tiny, hf)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask must be boolean"):
        logits(model, tokens, torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_activation_recompute_gives_the_same_loss_and_grads(world, tiny, hf, granularity):
    """With dropout on, so the recomputed forward must replay the same dropout masks (the
    model-parallel RNG tracker, redirected to the CPU generator)."""
    from megatron_qwen.runtime import seed_everything

    tokens = torch.randint(0, tiny.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(16).expand_as(tokens)
    results = []
    for recompute in (None, granularity):
        model = ours(tiny, hf, recompute_granularity=recompute, recompute_num_layers=1,
                     attention_dropout=0.1, hidden_dropout=0.1).train()
        seed_everything(7)
        loss = model(tokens, positions, None, labels=tokens).mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    assert loss0 == pytest.approx(loss1, abs=1e-6)
    seed_everything(8)  # a different dropout draw does change the loss: dropout is really on
    assert model(tokens, positions, None, labels=tokens).mean().item() != pytest.approx(loss1, abs=1e-4)
    assert all(torch.allclose(grads0[n], grads1[n], atol=1e-6) for n in grads0)


def test_layer_structure_and_names(world, tiny):
    (model,) = build_model(tiny, ParallelConfig())
    names = dict(model.named_parameters())
    h, ffn = tiny.hidden_size, tiny.ffn_hidden_size
    layer = "decoder.layers.0."
    assert names[layer + "self_attention.linear_qkv.weight"].shape == (3 * h, h)
    assert names[layer + "self_attention.linear_qkv.bias"].shape == (3 * h,)  # QKV bias on
    assert names[layer + "mlp.linear_fc1.weight"].shape == (2 * ffn, h)  # [gate; up]
    assert names[layer + "mlp.linear_fc2.weight"].shape == (h, ffn)
    assert {"embedding.word_embeddings.weight", "output_layer.weight",
            "decoder.final_layernorm.weight"} <= set(names)
    # no other bias anywhere, untied embeddings
    assert [n for n in names if n.endswith("bias")] == [
        f"decoder.layers.{i}.self_attention.linear_qkv.bias" for i in range(tiny.num_layers)]
    assert names["output_layer.weight"].data_ptr() != names["embedding.word_embeddings.weight"].data_ptr()
    assert model.decoder.layers[0].input_layernorm.eps == 1e-6


def test_inverse_frequencies_stay_fp32_with_bf16_params(world, tiny):
    (model,) = build_model(tiny, ParallelConfig(), params_dtype=torch.bfloat16)
    assert model.output_layer.weight.dtype == torch.bfloat16
    rope = model.rotary_pos_emb
    assert rope.inv_freq.dtype == torch.float32
    d = tiny.kv_channels  # RoPE over the whole head dim, base 10000
    want = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    assert rope.inv_freq.shape == (d // 2,)
    assert torch.allclose(rope.inv_freq.double(), want, rtol=1e-6)
    model.to(torch.bfloat16)  # a dtype cast of the module does not touch it either
    assert rope.inv_freq.dtype == torch.float32
    assert rope(32).dtype == torch.float32  # the angle table too
    tokens = torch.zeros(1, 8, dtype=torch.long)
    assert logits(model, tokens).dtype == torch.bfloat16


def test_sequence_parallel_marks_the_norm_weights(world, tiny):
    cfg = transformer_config(tiny, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    from megatron_qwen.model.norm import RMSNorm

    norm = RMSNorm(cfg, 8)
    assert norm.weight.sequence_parallel is True


def test_rmsnorm_matches_transformers(world):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from megatron_qwen.model.norm import RMSNorm

    cfg = transformer_config(load_model_config("tiny_vocab"), ParallelConfig())
    ours_, theirs = RMSNorm(cfg, 64, eps=1e-6), Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours_.weight.copy_(torch.randn(64))
        theirs.weight.copy_(ours_.weight)
    x = torch.randn(3, 5, 64) * 4
    assert torch.allclose(ours_(x), theirs(x), atol=1e-6)
    assert torch.allclose(ours_(x.bfloat16()).float(), theirs(x.bfloat16()).float(), atol=1e-2)


@pytest.mark.parametrize("layout, message", [
    (dict(tensor_model_parallel_size=3), "does not divide the 4 attention heads"),
    (dict(pipeline_model_parallel_size=3), "does not divide num_layers=4"),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4), "does not divide num_layers=4"),
    (dict(virtual_pipeline_model_parallel_size=2), "needs pipeline_model_parallel_size > 1"),
    (dict(sequence_parallel=True), "needs tensor_model_parallel_size > 1"),
    (dict(overlap_param_gather=True), "needs use_distributed_optimizer"),
])
def test_invalid_layouts_fail_with_one_line(tiny, layout, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_layout(tiny, ParallelConfig(**layout))
    assert "\n" not in str(err.value)


def test_invalid_model_and_world_fail_with_one_line(world, tiny):
    with pytest.raises(ConfigError, match="padded_vocab_size=1001") as err:
        check_layout(ModelConfig(**{**tiny.__dict__, "padded_vocab_size": 1001}),
                     ParallelConfig(tensor_model_parallel_size=2))
    with pytest.raises(ConfigError, match="smaller than model.vocab_size"):
        check_layout(ModelConfig(**{**tiny.__dict__, "padded_vocab_size": 512}), ParallelConfig())
    if not _flash_available():
        with pytest.raises(ConfigError, match="needs the flash_attn package"):
            check_layout(ModelConfig(**{**tiny.__dict__, "attention_backend": "flash"}), ParallelConfig())
    # the process groups are TP=1; asking for TP=2 in a world of one
    with pytest.raises(ConfigError, match="process groups are"):
        build_model(tiny, ParallelConfig(tensor_model_parallel_size=2))
    from megatron_qwen.runtime.distributed import check_world

    with pytest.raises(ConfigError, match="does not divide the world size 1"):
        check_world(ParallelConfig(tensor_model_parallel_size=2), 1)
    for msg in ("model.hidden_size=65", "model.attention_backend='xformers'"):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
            load_model_config("tiny_vocab", **({"hidden_size": 65} if "65" in msg else
                                               {"attention_backend": "xformers"}))


def _flash_available():
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


PUBLISHED = {"qwen_1p8b": 1_836_828_672, "qwen_7b": 7_721_324_544, "qwen_14b": 14_167_290_880}


def test_parameter_counts_match_released_shapes():
    """count_parameters (megatron-core model on the meta device, in a fresh process so it takes
    its standalone path) against transformers' Qwen2ForCausalLM on the meta device with the
    released shapes, and the published totals."""
    script = textwrap.dedent("""
        import json, torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from megatron_qwen.config import ModelConfig, load_model_config
        from megatron_qwen.model import count_parameters
        out = {}
        for preset in ("qwen_1p8b", "qwen_7b", "qwen_14b"):
            cfg = load_model_config(preset)
            ours = count_parameters(cfg)
            rows = cfg.vocab_size_padded(1)
            hf_cfg = Qwen2Config(vocab_size=rows, hidden_size=cfg.hidden_size,
                                 intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                                 num_attention_heads=cfg.num_attention_heads,
                                 num_key_value_heads=cfg.num_attention_heads, tie_word_embeddings=False)
            with torch.device("meta"):
                hf = sum(p.numel() for p in Qwen2ForCausalLM(hf_cfg).parameters())
            out[preset] = [ours, hf, rows]
        print("COUNTS", json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    counts = json.loads(proc.stdout.split("COUNTS", 1)[1])
    # Released embedding rows: 151,936 for 1.8B and 7B; 152,064 for 14B (its config.json).
    assert {p: c[2] for p, c in counts.items()} == {"qwen_1p8b": 151936, "qwen_7b": 151936, "qwen_14b": 152064}
    for preset, (ours, hf_meta, _) in counts.items():
        assert ours == hf_meta == PUBLISHED[preset], preset


def test_count_parameters_allocates_nothing(world, tiny):
    """The in-process (distributed) path also builds on the meta device."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = count_parameters(load_model_config("qwen_7b"))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert n == PUBLISHED["qwen_7b"]
    assert grown_mib < 1024  # 7B in fp32 would be ~29 GiB


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_bf16_mixed_precision_steps(world, tiny, hf, distributed_optimizer):
    """BF16 params (Float16Module) + megatron DDP + the mixed-precision megatron optimizer on CPU:
    the first loss matches the fp32 reference to bf16 precision, the optimizer keeps FP32 main
    weights, and three steps on one batch lower the loss."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    parallel = ParallelConfig(use_distributed_optimizer=distributed_optimizer)
    (chunk,) = build_model(tiny, parallel, params_dtype=torch.bfloat16)
    load_into_chunks([chunk], full_mcore_state(hf, tiny, 1), tiny, parallel)
    config = chunk.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
        Float16Module(config, chunk))
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16, clip_grad=1.0,
        use_distributed_optimizer=distributed_optimizer), [ddp])
    tokens = torch.randint(0, tiny.vocab_size, (2, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits_ = hf(tokens[:, :-1]).logits
        want = torch.nn.functional.cross_entropy(logits_.reshape(-1, logits_.size(-1)), tokens[:, 1:].reshape(-1))

    def forward_step(data, model):
        t = next(data)
        out = model(t[:, :-1], torch.arange(16).expand(2, 16), None, labels=t[:, 1:])
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach().clone()})

    losses = []
    for _ in range(3):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]),
                                          model=[ddp], num_microbatches=1, seq_length=16, micro_batch_size=2)
        ok, grad_norm, _ = optimizer.step()
        assert ok and grad_norm > 0
        losses.append(out[0]["loss"].item())
    assert losses[0] == pytest.approx(want.item(), abs=2e-2)
    assert losses[2] < losses[1] < losses[0]
    assert chunk.output_layer.weight.dtype == torch.bfloat16
    mains = [p for g in optimizer.param_groups for p in g["params"]]
    assert mains and all(p.dtype == torch.float32 for p in mains)
