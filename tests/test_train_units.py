"""Trainer pieces that need no model: LR schedule, blend, sampler, skip guard, start-up errors."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from megatron_qwen.config import ConfigError, build_config
from megatron_qwen import runtime
from megatron_qwen.training.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]


def _cfg(**groups):
    recipe = {"model": {"preset": "tiny_vocab"}, "data": {"data_path": ["unused"]}}
    for name, values in groups.items():
        recipe.setdefault(name, {}).update(values)
    return build_config(PretrainConfig, recipe)


def _write(prefix, docs, dtype=numpy.int32):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(torch.tensor(d), [len(d)])
    b.finalize(prefix + ".idx")


@pytest.fixture()
def world_of_one():
    """BlendedDataset asks torch.distributed for the rank: a one-process gloo group."""
    with runtime.world_of_one():
        yield


# --------------------------------------------------------------------------- LR schedule


def test_lr_schedule_is_warmup_then_cosine_to_min_lr():
    from megatron_qwen.training.optimizer import build_scheduler, reference_lr

    cfg = _cfg(optim={"lr": 3e-4, "min_lr": 3e-5, "lr_warmup_iters": 10}, train={"train_iters": 110})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = build_scheduler(cfg, opt)
    lrs = {}
    for it in range(1, 121):  # the loop steps the scheduler once before each optimizer step
        sched.step(1)
        lrs[it] = opt.param_groups[0]["lr"]
    assert lrs[1] == pytest.approx(3e-5) and lrs[5] == pytest.approx(1.5e-4)  # linear from 0
    assert lrs[10] == pytest.approx(3e-4)  # peak at the end of warm-up
    assert lrs[60] == pytest.approx(3e-5 + 0.5 * (3e-4 - 3e-5))  # cosine midpoint
    assert lrs[110] == pytest.approx(3e-5) and lrs[120] == pytest.approx(3e-5)  # floor = min_lr
    assert all(lrs[i + 1] <= lrs[i] + 1e-15 for i in range(10, 119))  # monotone decay
    for it, lr in lrs.items():
        assert lr == pytest.approx(reference_lr(it, 3e-4, 3e-5, 10, 110))


def test_code_qwen_schedule_is_3_percent_warmup_then_constant():
    from megatron_qwen.training.optimizer import build_scheduler, warmup_iters

    cfg = _cfg(optim={"lr": 6e-5, "min_lr": 6e-5, "lr_warmup_fraction": 0.03,
                      "lr_decay_style": "constant"}, train={"train_iters": 1000})
    assert warmup_iters(cfg) == 30
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(1000):
        sched.step(1)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[14] == pytest.approx(3e-5) and lrs[29] == pytest.approx(6e-5)
    assert lrs[29:] == pytest.approx([6e-5] * 971)


# --------------------------------------------------------------------------- data


def test_blend_weights_give_sample_counts_within_one_percent(tmp_path, world_of_one):
    from megatron_qwen.data.pretrain import build_pretrain_datasets, split_sizes

    rng = numpy.random.default_rng(0)
    for name, lo in (("web", 0), ("code", 500)):  # disjoint id ranges tell the corpora apart
        _write(str(tmp_path / name), [rng.integers(lo, lo + 400, rng.integers(20, 200)) for _ in range(300)])
    cfg = _cfg(data={"data_path": [0.7, str(tmp_path / "web"), 0.3, str(tmp_path / "code")],
                     "data_cache_path": str(tmp_path / "cache"), "eod_id": 999},
               train={"train_iters": 250, "global_batch_size": 16})
    train, valid, test = build_pretrain_datasets(cfg, split_sizes(250, 16, None, 1))
    assert len(train) >= 4000 and test is None
    ids = numpy.array([train[i]["dataset_id"] for i in range(len(train))])
    assert abs((ids == 0).mean() - 0.7) < 0.01 and abs((ids == 1).mean() - 0.3) < 0.01
    for i in range(0, len(train), 97):  # and each sample really comes from the corpus it names
        toks = train[i]["tokens"].numpy()
        assert ((toks >= 500) == bool(train[i]["dataset_id"])).mean() > 0.9
    sample = train[0]
    assert sample["tokens"].shape == (cfg.model.seq_length,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # next-token targets


def test_reset_attention_mask_ships_cu_seqlens_equal_to_megatrons_mask(tmp_path, world_of_one):
    """--reset-attention-mask: no dense mask through the DataLoader; the documents' cu_seqlens
    give megatron-core's own per-document mask and (as THD) its reset position ids."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megatron_qwen.data.pretrain import build_pretrain_datasets, split_sizes
    from megatron_qwen.model.varlen import block_causal_mask, thd_micro_batch

    rng = numpy.random.default_rng(1)
    # documents end with the EOD token, as tools/preprocess_data.py writes them
    _write(str(tmp_path / "web"), [[*rng.integers(0, 900, rng.integers(3, 40)), 999] for _ in range(200)])
    cfg = _cfg(data={"data_path": [str(tmp_path / "web")], "data_cache_path": str(tmp_path / "cache"),
                     "eod_id": 999, "reset_attention_mask": True, "split": "1,0,0"},
               train={"train_iters": 4, "global_batch_size": 2})
    assert cfg.packs_documents()
    train = build_pretrain_datasets(cfg, split_sizes(4, 2, None, 1))[0]
    batch = torch.utils.data.default_collate([train[i] for i in range(2)])
    assert "attention_mask" not in batch
    flat, packed = thd_micro_batch(batch)
    s = cfg.model.seq_length
    assert packed.cu_seqlens_q.numel() > 4  # several documents per sample
    for row in range(2):
        tokens = batch["tokens"][row]
        mask, _, positions = _get_ltor_masks_and_position_ids(tokens, 999, True, True, False, True)
        cu = batch["cu_seqlens"][row]
        assert torch.equal(block_causal_mask(cu[cu >= 0], s), mask[0])
        assert torch.equal(flat["position_ids"][0, row * s:(row + 1) * s], positions)


def test_sampler_deals_each_global_batch_once_and_resumes_in_place():
    from megatron_qwen.data.pretrain import PretrainingSampler

    gbs, mbs, dp = 8, 2, 2
    seen = []
    for rank in range(dp):
        batches = list(PretrainingSampler(64, 0, mbs, rank, dp))
        seen.append(batches)
    # per step, rank r's micro-batches are its contiguous quarter of the global batch
    flat = sorted(i for rank in seen for b in rank for i in b)
    assert flat == list(range(64))
    resumed = list(PretrainingSampler(64, 3 * gbs, mbs, 1, dp))
    assert resumed == seen[1][3 * gbs // (mbs * dp):]


def test_data_errors_are_one_line(tmp_path):
    from megatron_qwen.data.pretrain import check_corpus

    with pytest.raises(ConfigError, match=r"--data-path .*missing: no such file .*missing.bin"):
        check_corpus(str(tmp_path / "missing"), 1000)
    _write(str(tmp_path / "big"), [list(range(1990, 2010))] * 10)
    with pytest.raises(ConfigError, match="token id 2009 >= vocab size 1000; the corpus was tokenized with another"):
        check_corpus(str(tmp_path / "big"), 1000)
    _write(str(tmp_path / "few"), [[1, 2, 3]] * 3)
    with pytest.raises(ConfigError, match="leave the valid split of --split 98,2,0 without tokens"):
        check_corpus(str(tmp_path / "few"), 1000, "98,2,0")
    assert check_corpus(str(tmp_path / "few"), 1000, "1,0,0") == 9
    with pytest.raises(ConfigError, match="a blend is weight/prefix pairs"):
        _cfg(data={"data_path": [0.5, "a", "b"]}).data.blend()


def test_batch_layout_errors_are_one_line():
    with pytest.raises(ConfigError, match="not a multiple of --micro-batch-size 3"):
        _cfg(train={"global_batch_size": 8, "micro_batch_size": 3})
    cfg = _cfg(train={"global_batch_size": 6, "micro_batch_size": 2})
    with pytest.raises(ConfigError, match=r"--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"):
        cfg.check_world(2)
    assert cfg.check_world(3) == 3 and cfg.num_microbatches(3) == 1
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tensor x pipeline parallel = 2 x 1"):
        _cfg(parallel={"tensor_model_parallel_size": 2}).check_world(3)


def test_cli_reports_a_wrong_data_path_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_qwen.py"), "--config", str(REPO / "examples/pretrain_tiny.yaml"),
         "--data-path", str(tmp_path / "nope"), "--save", "none", "--load", "none",
         "--tensorboard-dir", "none"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --data-path ") and "nope.bin" in last
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- safety


def test_skip_guard_counts_and_stops_after_n_in_a_row():
    from megatron_qwen.training.loop import SkipGuard, TrainingStopped

    g = SkipGuard(3)
    assert [g.update(i, f) for i, f in enumerate([True, False, False, True, False], 1)] == \
        [False, True, True, False, True]
    assert g.total == 3 and g.in_a_row == 1
    g.update(6, False)
    with pytest.raises(TrainingStopped, match=r"iteration 7: 3 iterations in a row had a NaN/Inf"):
        g.update(7, False)


def test_model_flops_match_a_counted_forward_and_backward():
    """The formula against torch's FLOP counter over one real forward + backward of a tiny
    Qwen2 (transformers, eager attention, GQA): every matmul counted, and only attention's
    score and value products (the batched matmuls) halved, as Megatron-LM counts a causal mask."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    from megatron_qwen.config import load_model_config
    from megatron_qwen.training import metrics
    from tests.scripts.model_common import hf_reference

    m = dataclasses.replace(load_model_config("tiny_vocab"), num_query_groups=2)
    model = hf_reference(m).train()
    b, s = 2, 64
    ids = torch.randint(0, m.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    ops = counter.get_flop_counts()["Global"]
    assert set(ops) == {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm}
    attention = ops[torch.ops.aten.bmm]
    counted = sum(ops.values()) - attention / 2
    assert metrics.flops_per_token(m, s) * b * s == counted
    # tokens/s, TFLOP/s per GPU and MFU from the same count: 2 s on 4 GPUs of a 989 TFLOP/s peak
    t = metrics.throughput(dataclasses.replace(m, seq_length=s), tokens=b * s, seconds=2.0,
                           num_gpus=4, peak=989.0)
    assert t["tokens_per_sec"] == b * s / 2.0
    assert t["tflops_per_gpu"] == pytest.approx(counted / 2.0 / 4 / 1e12, rel=1e-12)
    assert t["mfu"] == pytest.approx(counted / 2.0 / 4 / 1e12 / 989.0, rel=1e-12)


def test_model_flops_are_the_megatron_paper_arithmetic():
    """Hand arithmetic, Narayanan et al. 2021 (Megatron-LM at scale, appendix): a multi-head
    model with an 8h/3 SwiGLU (12 h^2 weights per layer) trains in 72 B s L h^2 (1 + s/(12 h) +
    V/(12 L h)) FLOPs per batch (the paper's s/(6 h) halved: causal); full recompute makes it
    96 B s L h^2 (1 + s/(12 h) + V/(16 L h)) (the head is not recomputed); selective recompute
    adds core attention's forward, 2 h s per layer and token."""
    import dataclasses

    from megatron_qwen.config import load_model_config
    from megatron_qwen.training import metrics

    b, s, L, h, V = 3, 96, 5, 48, 1000
    m = load_model_config("tiny", num_layers=L, hidden_size=h, num_attention_heads=4, ffn_hidden_size=8 * h // 3,
                          vocab_size=V, make_vocab_size_divisible_by=8, seq_length=s)
    model = metrics.flops_per_token(m) * b * s
    assert model == pytest.approx(72 * b * s * L * h**2 * (1 + s / (12 * h) + V / (12 * L * h)), rel=1e-12)
    assert metrics.layer_flops_per_token(m) * b * s == pytest.approx(72 * b * s * h**2 * (1 + s / (12 * h)), rel=1e-12)
    assert metrics.head_flops_per_token(m) * b * s == 6 * b * s * V * h
    assert metrics.recompute_flops_per_token(m) == 0.0
    full = dataclasses.replace(m, recompute_granularity="full")
    assert model + metrics.recompute_flops_per_token(full) * b * s == pytest.approx(
        96 * b * s * L * h**2 * (1 + s / (12 * h) + V / (16 * L * h)), rel=1e-12)
    selective = dataclasses.replace(m, recompute_granularity="selective")
    assert metrics.recompute_flops_per_token(selective) * b * s == 2 * b * s * L * h * s


def test_head_and_full_recompute_flops_match_a_counted_step():
    """torch's FLOP counter over a tiny Qwen2 forward+backward with every decoder layer
    checkpointed (transformers' activation checkpointing, as full recompute; torch's early stop
    off, so the whole forward reruns as in megatron-core): the lm_head's count is the head term,
    and the whole count is model FLOPs plus full recompute's."""
    import dataclasses

    from torch.utils.checkpoint import set_checkpoint_early_stop
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_qwen.config import load_model_config
    from megatron_qwen.training import metrics
    from tests.scripts.model_common import hf_reference

    m = dataclasses.replace(load_model_config("tiny_vocab"), num_query_groups=2, recompute_granularity="full")
    model = hf_reference(m).train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # the first argument under either name
    b, s = 2, 64
    ids = torch.randint(0, m.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, set_checkpoint_early_stop(False):
        model(ids, labels=ids, use_cache=False).loss.backward()
    counts = counter.get_flop_counts()
    assert sum(counts["Qwen2ForCausalLM.lm_head"].values()) == metrics.head_flops_per_token(m) * b * s
    ops = counts["Global"]
    counted = sum(ops.values()) - ops[torch.ops.aten.bmm] / 2  # causal: half the attention products
    assert counted == (metrics.flops_per_token(m, s) + metrics.recompute_flops_per_token(m, s)) * b * s


def test_peak_tflops_by_device_name():
    from megatron_qwen.training import metrics

    assert metrics.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert metrics.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert metrics.peak_tflops("NVIDIA H100 NVL") == 835.0
    assert metrics.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert metrics.peak_tflops("NVIDIA H200") == 989.0 and metrics.peak_tflops("Tesla T4") is None
