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
    for p in _read(tmp_path / "a" / "pairs_train.jsonl"):
        assert p["chosen"] != p["rejected"] and sorted(p["chosen"].replace(" ", "")) == sorted(p["rejected"].replace(" ", ""))
    sft = _read(tmp_path / "a" / "sft.jsonl")
    assert all([m["role"] for m in s["messages"]] == ["user", "assistant"] for s in sft)
