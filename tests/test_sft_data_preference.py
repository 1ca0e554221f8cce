"""Preference pairs: rendering, the reward's end token, truncation that keeps it, skip accounting."""

import json

import pytest
import torch

from megatron_qwen.data.preference import PreferenceDataset, collate_pairs, load_preference_pairs
from megatron_qwen.tokenizer import load_tokenizer, render_chatml

PROMPT = [{"role": "user", "content": "Name a primary colour."}]
PAIRS = [
    {"prompt": PROMPT, "chosen": "Red is a primary colour.", "rejected": "Colour primary a red is."},
    {"prompt": "天空是什么颜色？", "chosen": "晴天时天空是蓝色的。", "rejected": "天空是绿色的。"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _write(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


def test_pairs_render_as_assistant_turns_ending_in_im_end(tok, tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps(p, ensure_ascii=False) for p in PAIRS])
    ds = PreferenceDataset(path, tok, seq_length=128)
    assert len(ds) == 2 and ds.skips.total == 0 and ds.truncated == 0
    expected = render_chatml(PROMPT + [{"role": "assistant", "content": PAIRS[0]["chosen"]}], tok).ids
    assert ds[0]["chosen_ids"].tolist() == expected
    batch = collate_pairs([ds[0], ds[1]], pad_id=tok.pad)
    assert batch["input_ids"].shape[0] == 4
    for row, end in zip(batch["input_ids"], batch["end_index"]):
        assert row[end] == tok.im_end_id and (row[end + 1 :] == tok.pad).all()
    replies = [tok.decode(batch["input_ids"][i, : batch["end_index"][i] + 1].tolist()).rsplit("assistant\n", 1)[1]
               for i in range(4)]
    assert replies == [p[k] + "<|im_end|>" for k in ("chosen", "rejected") for p in PAIRS]
    assert batch["attention_mask"].sum(1).tolist() == (batch["end_index"] + 1).tolist()


def test_truncation_keeps_the_end_token(tok, tmp_path):
    long_prompt = [{"role": "user", "content": "Please read this. " * 80 + "Which is better?"}]
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": long_prompt, "chosen": "A.", "rejected": "B!"})])
    pairs, _, truncated = load_preference_pairs(path, tok, seq_length=32)
    assert truncated == 1
    full = render_chatml(long_prompt + [{"role": "assistant", "content": "A."}], tok).ids
    assert pairs[0].chosen.tolist() == full[-32:] and pairs[0].chosen_end == 31
    assert pairs[0].chosen[-1] == tok.im_end_id and pairs[0].rejected[-1] == tok.im_end_id


def test_bad_pairs_are_skipped_and_counted(tok, tmp_path):
    path = _write(tmp_path / "bad.jsonl", [
        json.dumps(PAIRS[0]),
        json.dumps({"prompt": PROMPT, "chosen": "same", "rejected": "same"}),
        "[1, 2]",
        "{oops",
        json.dumps({"prompt": [{"role": "narrator", "content": "x"}, *PROMPT], "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": PROMPT, "chosen": 1, "rejected": "b"}),
        json.dumps({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}),
        b"\xff\xfe",
    ])
    pairs, skips, _ = load_preference_pairs(path, tok, seq_length=64)
    assert len(pairs) == 1
    assert dict(skips.counts) == {"identical_pair": 1, "not_an_object": 1, "malformed_json": 1, "unknown_role": 1,
                                 "bad_pair": 1, "bad_prompt": 1, "invalid_utf8": 1}
    assert skips.places["identical_pair"] == [f"{path}:2: identical_pair"]
    assert skips.places["unknown_role"][0].startswith(f"{path}:5: unknown_role (message 0: unknown role 'narrator'")
    with pytest.raises(ValueError, match="pad_to"):
        collate_pairs([{"chosen_ids": torch.ones(5, dtype=torch.long), "rejected_ids": torch.ones(3, dtype=torch.long)}],
                      pad_id=0, pad_to=4)
