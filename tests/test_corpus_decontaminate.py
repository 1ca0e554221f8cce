"""Decontamination: samples sharing a 13-gram with a benchmark are removed and the benchmark is
named; normalisation (case, punctuation, NFKC) and CJK characters count; the vectorised n-gram
hashing agrees with a plain set-of-tuples reference."""

import json
import random
import runpy
from pathlib import Path

import pytest

from megatron_qwen.data.corpus.decontaminate import (
    DecontaminateConfig, Decontaminator, build_index, tokens_of,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "multilingual.jsonl"
DOCS = {d["id"]: d["text"] for d in map(json.loads, DATA.read_text().splitlines())}

# "test sets" made of real sentences from the report and the Chinese paragraphs
MATH_Q = ("To enhance the mathematical reasoning of the model, we trained it on a curated corpus "
          "of math problems with step-by-step solutions.")
ZH_Q = "长城不仅是一项建筑奇迹，也是中华民族坚韧不拔精神的象征"
SHORT_Q = "Who introduced the series of Qwen language models?"  # 8 tokens: matched whole


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture()
def benchmarks(tmp_path):
    math = write_jsonl(tmp_path / "math.jsonl", [{"question": "What is 2 + 2?"}, {"question": MATH_Q}])
    zh = write_jsonl(tmp_path / "zh.jsonl", [{"question": ZH_Q, "answer": "是"}, {"question": SHORT_Q}])
    return math, zh


def decide(cfg, text_or_record):
    index = build_index(cfg)
    record = text_or_record if isinstance(text_or_record, dict) else {"text": text_or_record}
    from megatron_qwen.data.corpus.jsonl import Doc

    return Decontaminator(cfg, index)(Doc("sample.jsonl", 1, record))


def test_overlaps_are_found_through_normalisation(benchmarks):
    math, zh = benchmarks
    cfg = DecontaminateConfig(output="o", benchmark=[f"math={math}", f"zh={zh}"], benchmark_key=["question"])
    # same 13 words, different case and punctuation, inside other text
    shouted = "Here is a sample. " + MATH_Q.upper().replace(",", " ;").replace("-", " - ") + " The end."
    out = decide(cfg, shouted)
    assert out.reason == "benchmark:math" and f"{math}:2" in out.detail
    # Chinese: character 13-grams, full-width punctuation and NFKC width variants do not hide it
    out = decide(cfg, "导游说：" + ZH_Q[2:17].replace("，", ",") + "。")
    assert out.reason == "benchmark:zh" and f"{zh}:1" in out.detail
    # a short benchmark question (8 tokens) is matched as a whole
    assert decide(cfg, "Quiz: who introduced the series of Qwen language models? Alibaba.").reason == "benchmark:zh"
    # chat messages: every string inside the field is checked
    msgs = {"messages": [{"role": "user", "content": "Solve it."},
                         {"role": "assistant", "content": MATH_Q}]}
    cfg_msgs = DecontaminateConfig(output="o", benchmark=[f"math={math}"], benchmark_key=["question"],
                                   text_key=["messages"])
    assert decide(cfg_msgs, msgs).reason == "benchmark:math"


def test_twelve_shared_words_are_not_an_overlap(benchmarks):
    math, zh = benchmarks
    cfg = DecontaminateConfig(output="o", benchmark=[f"math={math}"], benchmark_key=["question"])
    words = MATH_Q.split()
    twelve = " ".join(words[:12]) + " banana " + " ".join(words[12:])  # breaks every 13-gram
    assert isinstance(decide(cfg, twelve), dict)
    assert isinstance(decide(cfg, DOCS["en-5"]), dict)
    # "What is 2 + 2?" has 4 tokens < min_ngram: ignored, counted
    index = build_index(cfg)
    assert index.items["math"] == 2 and index.too_short["math"] == 1


def test_hashing_agrees_with_a_set_of_tuples_reference(tmp_path):
    rng = random.Random(0)
    texts = list(DOCS.values())
    bench_rows = []
    for _ in range(30):  # benchmark items cut from the corpus itself, and some from nowhere
        toks = tokens_of(rng.choice(texts))
        start = rng.randrange(max(1, len(toks) - 20))
        bench_rows.append({"text": " ".join(toks[start : start + rng.randint(8, 20)])})
    bench = write_jsonl(tmp_path / "b.jsonl", bench_rows)
    cfg = DecontaminateConfig(output="o", benchmark=[f"b={bench}"], ngram=13, min_ngram=8)
    ref = set()
    for row in bench_rows:
        toks = tokens_of(row["text"])
        n = min(13, len(toks))
        ref |= {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}
    lengths = {len(g) for g in ref}
    decontaminator = Decontaminator(cfg, build_index(cfg))
    removed = 0
    for text in texts:
        toks = tokens_of(text)
        expected = any(tuple(toks[i : i + n]) in ref for n in lengths for i in range(len(toks) - n + 1))
        assert (decontaminator.match(text) is not None) == expected, text[:60]
        removed += expected
    assert 0 < removed < len(texts)


def test_tool_reports_removals_per_benchmark(benchmarks, tmp_path):
    math, zh = benchmarks
    src = write_jsonl(tmp_path / "sft.jsonl", [
        {"id": 1, "text": DOCS["en-4"]},
        {"id": 2, "text": "Answer: " + MATH_Q},
        {"id": 3, "text": "请介绍一下：" + ZH_Q},
        {"id": 4, "text": DOCS["zh-3"]},
        {"id": 5, "text": MATH_Q.lower() + " " + ZH_Q},
    ])
    out, rej, summary = tmp_path / "out.jsonl", tmp_path / "rej.jsonl", tmp_path / "s.json"
    main = runpy.run_path(str(REPO / "tools" / "decontaminate.py"), run_name="tool")["main"]
    main(["--input", str(src), "--output", str(out), "--rejected", str(rej), "--benchmark", f"math={math}",
          "--benchmark", f"zh={zh}", "--benchmark-key", "question", "answer", "--ngram", "13",
          "--summary", str(summary), "--no-progress", "--workers", "2", "--chunk-bytes", "200"])
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1, 4]
    s = json.loads(summary.read_text())
    assert s["removed"] == {"benchmark:math": 2, "benchmark:zh": 1}
    hits = {json.loads(x)["id"]: json.loads(x)["_rejected"] for x in rej.read_text().splitlines()}
    assert hits[3]["reason"] == "benchmark:zh" and hits[3]["source"] == f"{src}:3"


def test_texts_that_are_not_text_are_skipped_as_wrong_type(benchmarks, tmp_path):
    # before: an int, a float or a list of numbers was "checked" (no string, no overlap) and kept
    math, _ = benchmarks
    rows = [{"id": 1, "text": 7}, {"id": 2, "text": 2.5}, {"id": 3, "text": [1, 2]}, {"id": 4, "text": True},
            {"id": 5, "text": None}, {"id": 6, "text": []},
            {"id": 7, "text": [{"role": "user", "content": "a chat turn"}]}, {"id": 8, "text": "plain text"}]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    out, summary = tmp_path / "out.jsonl", tmp_path / "s.json"
    main = runpy.run_path(str(REPO / "tools" / "decontaminate.py"), run_name="tool")["main"]
    main(["--input", str(src), "--output", str(out), "--benchmark", f"math={math}", "--benchmark-key", "question",
          "--summary", str(summary), "--no-progress"])
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [7, 8]
    s = json.loads(summary.read_text())
    assert s["skipped"] == {"wrong_type": 4, "null_field": 1, "empty_text": 1}
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in s["skipped_at"]["wrong_type"]] == ["1", "2", "3", "4"]
    assert s["skipped_at"]["wrong_type"][2].endswith("('text' is a list holding no string)")


def test_index_memory_is_bounded_by_the_benchmarks_not_the_corpus(tmp_path):
    """A benchmark far larger than the others here (6,000 items of real text, each two random
    16-word windows of CPython's docs, ~0.1M distinct 13-grams):
    the index keeps 12 bytes per distinct n-gram, building it peaks under 64 bytes per n-gram
    read plus 1 KB per item (its arrays, copies while sorting, the item's source), and the last
    item is still found. Samples stream through the runner, so the training corpus adds nothing."""
    import random
    import tracemalloc

    from megatron_qwen.data import real_corpus
    from megatron_qwen.data.corpus.decontaminate import DecontaminateConfig
    from megatron_qwen.data.corpus.jsonl import Doc

    words = " ".join(d["text"] for d in real_corpus.python_doc_topics()).split()
    rng = random.Random(0)
    texts = [" ".join(words[s : s + 16] + words[t : t + 16])
             for s, t in ((rng.randrange(len(words) - 16), rng.randrange(len(words) - 16)) for _ in range(6_000))]
    bench = write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in texts])
    cfg = DecontaminateConfig(output=str(tmp_path / "o.jsonl"), benchmark=[f"big={bench}"])
    tracemalloc.start()
    try:
        index = build_index(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    read = sum(max(len(tokens_of(t)) - 12, 1) for t in texts)
    assert index.hashes.size > 50_000 and index.items["big"] == 6_000
    assert index.hashes.nbytes + index.owners.nbytes == 12 * index.hashes.size
    assert peak < 64 * read + 1024 * 6_000, (peak, read)
    hit = Decontaminator(cfg, index)(Doc("sample.jsonl", 1, {"text": "intro words here " + texts[-1]}))
    assert hit.reason == "benchmark:big"
