import json

from megatron_qwen.data import demo_data, real_corpus


def _read(path):
    return [json.loads(l) for l in open(path, encoding="utf-8")]


def test_real_corpus_is_multilingual_real_text():
    docs = real_corpus.multilingual_corpus(max_chinese=20)
    langs = {d["lang"] for d in docs}
    assert {"en", "zh"} <= langs
    pydoc_for = next(d for d in docs if d["id"] == "pydoc:for")
    assert 'The "for" statement is used to iterate over the elements of a sequence' in pydoc_for["text"]
    zh = [d for d in docs if d["lang"] == "zh"]
    assert all(sum("\u4e00" <= c <= "\u9fff" for c in d["text"]) > len(d["text"]) // 3 for d in zh)
    assert not any("/n" in d["text"] or "/v " in d["text"] for d in zh)  # POS tags stripped


def test_demo_data_is_deterministic_and_plants_known_defects(tmp_path):
    a = demo_data.build(tmp_path / "a", seed=7, max_chinese=40)
    demo_data.build(tmp_path / "b", seed=7, max_chinese=40)
    for name in ("raw.jsonl", "sft.jsonl", "pairs_train.jsonl", "benchmark.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    raw = _read(tmp_path / "a" / "raw.jsonl")
    assert len(raw) == a["raw_docs"]
    assert sum(r["id"].endswith("#copy") for r in raw) == a["planted"]["exact"] == 20
    assert sum(r["id"].endswith("#near") for r in raw) == 15
    texts = {r["id"]: r["text"] for r in raw}
    for b in _read(tmp_path / "a" / "benchmark.jsonl"):  # each benchmark passage quotes its source
        assert " ".join(texts[b["source_doc"]].split()).find(b["question"]) >= 0
    sft = _read(tmp_path / "a" / "sft.jsonl")
    roles = [[m["role"] for m in s["messages"]] for s in sft]
    assert all(r == ["user", "assistant"] * (len(r) // 2) and r for r in roles)
    assert any(len(r) > 2 for r in roles)  # the multi-turn sums


def test_demo_heldout_sets_are_disjoint_from_what_is_trained(tmp_path):
    """Every "after" number of the demo is measured on data no stage trains on."""
    from megatron_qwen.rlhf.ppo.rule_reward import expected_answer, score_text

    demo_data.build(tmp_path, seed=7, max_chinese=40)
    raw_ids = {r["id"] for r in _read(tmp_path / "raw.jsonl")}
    heldout = _read(tmp_path / "heldout_text.jsonl")
    assert heldout and not raw_ids & {d["id"] for d in heldout}
    train_text = " ".join(m["content"] for s in _read(tmp_path / "sft.jsonl") for m in s["messages"])
    assert not any(" ".join(d["text"].split()[:30]) in train_text for d in heldout)

    def sums(name, key):
        rows = _read(tmp_path / name)
        return {expected_answer(r[key][0]["content"]) is not None and r[key][0]["content"] for r in rows}

    def digit_pairs(name, key):
        import re

        rows = [r for r in _read(tmp_path / name) if key != "messages" or len(r[key]) == 1
                or r[key][1]["content"].isdigit()]  # SFT: only the arithmetic conversations
        return {tuple(re.findall(r"\d+", r[key][0]["content"])[:2]) for r in rows}

    sft_pairs = digit_pairs("sft.jsonl", "messages")
    assert len(sft_pairs) == 50
    unseen = digit_pairs("prompts_unseen.jsonl", "messages")
    assert not sft_pairs & unseen and not digit_pairs("prompts.jsonl", "messages") & unseen
    assert not sft_pairs & digit_pairs("prompts.jsonl", "messages")
    assert digit_pairs("prompts_test.jsonl", "messages") == digit_pairs("prompts.jsonl", "messages")
    assert not sums("prompts.jsonl", "messages") & sums("prompts_test.jsonl", "messages")  # new phrasing
    assert not digit_pairs("pairs_test.jsonl", "prompt") & digit_pairs("pairs_train.jsonl", "prompt")
    for p in _read(tmp_path / "pairs_test.jsonl") + _read(tmp_path / "pairs_train.jsonl"):
        question = p["prompt"][0]["content"]
        assert score_text(question, p["chosen"]) == 1.0 and score_text(question, p["rejected"]) == 0.0
