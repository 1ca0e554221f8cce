"""SFT samples: loss only on assistant tokens, packing layout and isolation, skip accounting."""

import json

import pytest
import torch

from megatron_qwen.data.sft import SFTDataArgs, SFTDataset, load_conversations, pack
from megatron_qwen.model.varlen import block_causal_mask
from megatron_qwen.tokenizer import load_tokenizer, render_chatml

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And of Germany?"},
     {"role": "assistant", "content": "Berlin."}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"},
     {"role": "user", "content": "用一句话介绍长城。"},
     {"role": "assistant", "content": "长城是中国古代修建的军事防御工程，全长两万多公里。"}],
    [{"role": "user", "content": "Write 2+2 in Python."}, {"role": "assistant", "content": "print(2 + 2)"}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    [{"role": "user", "content": "Count: 1, 2, 3?"}, {"role": "assistant", "content": "4, 5, 6."}],
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _write(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


@pytest.fixture
def sft_file(tmp_path):
    return _write(tmp_path / "sft.jsonl", [json.dumps({"messages": m}, ensure_ascii=False) for m in CONVERSATIONS])


def test_only_assistant_tokens_carry_loss(tok, sft_file):
    ds = SFTDataset(sft_file, tok, seq_length=96, packing=False, seed=0)
    found = 0
    for i in range(len(ds)):
        sample = ds[i]
        conv = CONVERSATIONS[ds.samples[i][0]]
        targets = sample["labels"][sample["loss_mask"].bool()].tolist()
        expected = "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")
        assert tok.decode(targets) == expected
        # labels are the next tokens of the rendered conversation
        ids, _ = render_chatml(conv, tok)
        n = len(ids) - 1
        assert sample["tokens"][:n].tolist() == ids[:-1] and sample["labels"][:n].tolist() == ids[1:]
        assert sample["loss_mask"].dtype == torch.float32 and sample["loss_mask"][n:].sum() == 0
        found += conv is CONVERSATIONS[0]
    assert found == 1 and len(ds) == len(CONVERSATIONS)


def test_packing_layout_positions_and_document_boundaries(tok, sft_file):
    s = 128
    ds = SFTDataset(sft_file, tok, seq_length=s, packing=True, seed=3)
    assert len(ds) < len(CONVERSATIONS)  # several conversations share a sample
    assert sorted(i for b in ds.samples for i in b) == list(range(len(CONVERSATIONS)))
    for idx in range(len(ds)):
        sample = ds[idx]
        assert "attention_mask" not in sample  # no [s, s] mask through the DataLoader
        assert sample["tokens"].shape == (s,) and sample["cu_seqlens"].shape == (s + 1,)
        assert sample["cu_seqlens"].dtype == torch.int32
        pos, cu = sample["position_ids"].tolist(), sample["cu_seqlens"].tolist()
        starts = [0]
        for k in ds.samples[idx]:
            n = ds.conversations[k].positions
            assert pos[starts[-1] : starts[-1] + n] == list(range(n))
            starts.append(starts[-1] + n)
        if starts[-1] < s:  # the padding tail is a document of its own
            starts.append(s)
        assert cu == starts + [-1] * (s + 1 - len(starts))
        assert not torch.isnan(sample["loss_mask"]).any()


def test_packed_sample_equals_separate_runs_of_a_real_model(tok, sft_file):
    # transformers' Qwen2ForCausalLM (tiny, random) on a packed sample with our mask and positions
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).eval()
    ds = SFTDataset(sft_file, tok, seq_length=128, packing=True, seed=3)
    idx = max(range(len(ds)), key=lambda i: len(ds.samples[i]))
    sample = ds[idx]
    cu = sample["cu_seqlens"]
    mask = block_causal_mask(cu[cu >= 0], 128)  # what the dense fallback builds from cu_seqlens
    with torch.no_grad():
        packed = model(input_ids=sample["tokens"][None], position_ids=sample["position_ids"][None],
                       attention_mask=~mask[None, None]).logits[0]  # HF: True = attend
        offset = 0
        for k in ds.samples[idx]:
            conv = ds.conversations[k]
            alone = model(input_ids=torch.from_numpy(conv.ids[:-1])[None]).logits[0]
            torch.testing.assert_close(packed[offset : offset + conv.positions], alone, atol=1e-5, rtol=1e-5)
            offset += conv.positions


def test_deterministic_given_seed(tok, sft_file):
    a, b = SFTDataset(sft_file, tok, 128, seed=7), SFTDataset(sft_file, tok, 128, seed=7)
    assert a.samples == b.samples and all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    orders = {tuple(map(tuple, SFTDataset(sft_file, tok, 128, packing=False, seed=s).samples)) for s in range(4)}
    assert len(orders) > 1


def test_skipped_lines_are_counted_with_line_numbers(tok, tmp_path):
    good = json.dumps({"messages": CONVERSATIONS[3]})
    path = _write(tmp_path / "bad.jsonl", [
        good,
        "{not json",
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps({"messages": []}),
        b'{"messages": [{"role": "user", "content": "\xff"}]}',
        json.dumps({"messages": "hello"}),
        json.dumps({"messages": CONVERSATIONS[0]}),  # too long for seq_length=24
        "",
        good,
    ])
    convs, skips, truncated = load_conversations(path, tok, seq_length=24, truncation="drop")
    assert len(convs) == 2 and truncated == 0
    assert dict(skips.counts) == {"malformed_json": 1, "unknown_role": 1, "no_assistant_turn": 1,
                                 "empty": 1, "invalid_utf8": 1, "bad_conversation": 1, "too_long": 1}
    places = [p for ps in skips.places.values() for p in ps]
    assert f"{path}:3: unknown_role (message 0: unknown role 'robot' (expected one of system, user, assistant))" in places
    assert any(p.startswith(f"{path}:8: too_long") for p in places)
    convs, skips, truncated = load_conversations(path, tok, seq_length=40, truncation="truncate")
    assert truncated == 1 and "too_long" not in skips.counts
    assert max(len(c.ids) for c in convs) == 41


def test_pack_and_args(tok):
    assert pack([5, 3, 4, 2, 6], capacity=8) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="capacity"):
        pack([9], capacity=8)
    from megatron_qwen.config import ConfigError

    with pytest.raises(ConfigError, match="sft_truncation"):
        SFTDataArgs(sft_truncation="cut").validate()
    assert SFTDataArgs(sft_data_path="a.jsonl, b.jsonl").paths == ["a.jsonl", "b.jsonl"]


def test_trainer_hook_splits_and_repeats_epochs(tok, sft_file):
    from megatron_qwen.config import build_config
    from megatron_qwen.data.sft import build_sft_datasets
    from megatron_qwen.training.config import PretrainConfig

    cfg = build_config(PretrainConfig, {"model": {"preset": "tiny", "seq_length": 64},
                                        "data": {"split": "80,20,0"}, "sft": {"sft_data_path": str(sft_file)},
                                        "train": {"task": "sft"}})
    train, valid, test = build_sft_datasets(cfg, [12, 4, 4])
    assert test is None and len(train) == 12 and len(valid) == 4
    n = len(train.dataset)  # one epoch of the train split, then a reshuffled one
    first = [tuple(train[i]["tokens"].tolist()) for i in range(n)]
    second = [tuple(train[i]["tokens"].tolist()) for i in range(n, 2 * n)]
    assert sorted(first) == sorted(second) and len(set(first)) == n
    valid_tokens = {tuple(valid[i]["tokens"].tolist()) for i in range(len(valid))}
    assert not valid_tokens & set(first)  # the splits do not share samples
