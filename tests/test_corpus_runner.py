"""The shared JSONL reader and runner: skip accounting, strict mode, order across workers,
atomic output, list flags. Real behaviour only: files on disk, real worker processes."""

import gzip
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_qwen.data.corpus.jsonl import CorpusError, ReadOptions, SkipLog, iter_chunks, read_jsonl
from megatron_qwen.data.corpus.runner import JobConfig, Remove, Summary, filter_job, map_chunks

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "multilingual.jsonl"


def tool(name):
    return runpy.run_path(str(REPO / "tools" / f"{name}.py"), run_name="tool")["main"]


def bad_file(tmp_path) -> Path:
    """Good records with one bad line of each kind, at known line numbers."""
    good = [json.loads(line) for line in DATA.read_text().splitlines()]
    lines = [json.dumps(good[0]).encode()]                       # 1 ok
    lines.append(b'{"text": "unterminated')                     # 2 malformed_json
    lines.append('{"text": "caf\u00e9"}'.encode("latin-1"))     # 3 invalid_utf8
    lines.append(b"[1, 2, 3]")                                   # 4 not_an_object
    lines.append(b'{"title": "no text field"}')                 # 5 missing_field
    lines.append(b'{"text": ""}')                                # 6 empty_text
    lines.append(b"")                                            # 7 blank: not a record
    lines.append(json.dumps({"text": "x" * 5000}).encode())      # 8 too_large (limit 4000)
    lines.append(b'{"text": 42}')                                # 9 wrong_type
    lines.append(b'{"text": "lone \\ud83d surrogate"}')          # 10 invalid_utf8 (escape)
    lines.append(json.dumps(good[1], ensure_ascii=False).encode())  # 11 ok
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines))  # no final newline: the last line still counts
    return path


EXPECTED_SKIPS = {"malformed_json": [2], "invalid_utf8": [3, 10], "not_an_object": [4],
                  "missing_field": [5], "empty_text": [6], "blank": [7], "too_large": [8], "wrong_type": [9]}


@pytest.mark.parametrize("fast_json", [False, True])
def test_reader_counts_every_bad_line_with_its_place(tmp_path, fast_json):
    # fast_json (orjson, preprocess_data's reader) must accept and skip exactly the same lines,
    # with the same reasons and messages
    path = bad_file(tmp_path)
    with path.open("ab") as f:  # lines 12-14: a surrogate pair escape and NaN are fine, deep nesting not
        f.write(b'\n{"text": "pair \\ud83d\\ude00 ok", "n": NaN}\n{"text": "big", "id": 123456789012345678901234567890}'
                b'\n{"text": "deep", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}\n")
        f.write(b'{"text": null}\n'                                       # 15 null_field
                b'{"text": "first", "text": "second"}\n'                  # 16 duplicate_key (top level)
                b'{"text": "a:b", "meta": {"k": 1, "k": "x:y"}}\n'        # 17 duplicate_key (nested)
                b'{"text": "\\u003a", "text": "c"}\n'                    # 18 duplicate_key (escaped colon)
                b'{"text": "a : b :: c", "m": [{"x": ":"}], "y": "\\u003a"}\n'  # 19 ok: colons in strings
                b' \t \r\n'                                               # 20 blank (whitespace only)
                b'{"text": "x", "meta": {"t": "\\ud800"}}\n')             # 21 invalid_utf8 (not the text)
    skips = SkipLog()
    docs = list(read_jsonl([str(path)], ReadOptions(max_doc_bytes=4000, fast_json=fast_json), skips))
    assert [d.line for d in docs] == [1, 11, 12, 13, 19]
    assert docs[2].record["text"] == "pair \U0001F600 ok" and docs[3].record["text"] == "big"
    expected = {**EXPECTED_SKIPS, "malformed_json": [2, 14], "null_field": [15], "duplicate_key": [16, 17, 18],
                "blank": [7, 20], "invalid_utf8": [3, 10, 21]}
    assert len(docs) + skips.total == 21  # every line is a record or a counted skip
    assert skips.places["duplicate_key"][1].endswith("('k')")
    assert dict(skips.counts) == {k: len(v) for k, v in expected.items() if v}
    for reason, lines in expected.items():
        assert [p.split(":")[1] for p in skips.places.get(reason, [])] == [str(n) for n in lines], reason
        assert all(p.startswith(f"{path}:") for p in skips.places.get(reason, []))
    if fast_json:
        slow = SkipLog()
        list(read_jsonl([str(path)], ReadOptions(max_doc_bytes=4000), slow))
        assert slow.places == skips.places


# lines where orjson's record is not the standard parser's (wide integers become floats, nesting
# to 1023 is accepted), or could be (floats at the edges of the double range, escapes, repeats)
FAST_JSON_EDGES = [
    b'{"text": "a", "id": 123456789012345678901234567890}',
    b'{"text": "b", "id": -9223372036854775809, "score": 0.5}',
    b'{"text": "c", "id": 18446744073709551616}',
    b'{"text": "d", "id": 18446744073709551615, "n": -0}',
    b'{"text": "e", "meta": {"ids": [1, 99999999999999999999], "p": 0.1}}',
    b'{"text": "f 1234567890123456789012", "x": [5e-324, 1.7976931348623157e308, 2.2250738585072011e-308, 1e-400]}',
    b'{"text": "g", "x": 0.30000000000000004, "y": 1E5, "z": -0.0}',
    '{"text": "caf\\u00e9 \\ud83d\\ude00 \u4e2d\u6587 \u00e9", "t": "\\u0000\\"\\\\/"}'.encode(),
    b'{"text": "h", "x": ' + b"[" * 600 + b"]" * 600 + b"}",
    b'{"text": "i", "x": ' + b"[" * 1010 + b"]" * 1010 + b"}",
    b'{"text": "j", "x": ' + b'{"a":' * 499 + b"1" + b"}" * 499 + b"}",
    b'{"text": "k", "text": "again"}',
    b'{"text": "l", "x": "\\udc00"}',
    b'{"text": "m", "x": NaN, "y": Infinity, "z": 1e400}',
    b"123456789012345678901234567890",
]


def test_fast_json_gives_the_standard_parsers_records_exactly(tmp_path):
    # dedup parses with orjson and writes the records back: every record must be the standard
    # parser's, value for value and type for type (a wide id turned into a float would change
    # the output and the report), and every skip the same
    from megatron_qwen.data.corpus.jsonl import dump_line

    path = tmp_path / "edges.jsonl"
    path.write_bytes(b"\n".join(FAST_JSON_EDGES) + b"\n")
    out = {}
    for fast in (False, True):
        skips = SkipLog()
        docs = list(read_jsonl([str(path)], ReadOptions(fast_json=fast), skips))
        out[fast] = ([(d.line, dump_line(d.record), repr(d.record)) for d in docs], skips.places)
    assert out[True] == out[False]
    assert len(out[False][0]) == 11  # the edges above are records, not skips (all but 4)


def test_dump_line_writes_what_the_standard_encoder_writes():
    # flat records go through orjson field by field: every code point, every integer width and
    # every value type must give json.dumps(record, ensure_ascii=False)'s bytes
    from megatron_qwen.data.corpus.jsonl import compact_line, dump_line

    every_char = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    records = [{}, {"text": every_char, "id": "x"}, {'k"\\\n\x00': "\x1f\x7f\u2028\u2029\ufeff"},
               {"a": 2**63 - 1, "b": -2**63, "c": 2**64 - 1, "d": 2**64, "e": -2**63 - 1},
               {"t": True, "f": False, "n": None, "z": 0, "m": -0}, {"x": 0.1, "y": float("nan")},
               {"nested": {"a": [1, "b"]}}, {"l": []}, {1: "a"}]
    for record in records:
        assert dump_line(record) == (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"), record
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate cannot be written, as before
        dump_line({"text": "\ud800"})
    # compact_line (dedup's place file): read back as the same values, of the same types
    for record in records[1:-1]:
        values = ["f", 1, *record.values()]
        back = json.loads(compact_line(values))
        assert json.dumps(back) == json.dumps(values) and list(map(type, back)) == list(map(type, values)), values


def test_strict_turns_the_first_skip_into_a_one_line_error(tmp_path):
    path = bad_file(tmp_path)
    with pytest.raises(CorpusError) as err:
        list(read_jsonl([str(path)], ReadOptions(strict=True)))
    assert str(err.value).startswith(f"{path}:2: not valid JSON")
    assert "\n" not in str(err.value)
    # the command line: one line on stderr, exit status 1, no output file
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "filter.py"), "--input", str(path),
                           "--output", str(out), "--strict", "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}:2: not valid JSON (Unterminated string starting at, column 10)"]
    assert not out.exists() and not list(tmp_path.glob("out.jsonl.tmp*"))


def test_giant_line_is_dropped_while_streaming_and_line_numbers_stay_right(tmp_path):
    path = tmp_path / "giant.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"text": "first"}\n')
        f.write(b'{"text": "' + b"y" * 300_000 + b'"}\n')  # bigger than one read block
        f.write(b'{"text": "third"}\n{"text": "fourth"}\n')
    skips = SkipLog()
    chunks = list(iter_chunks([str(path)], chunk_bytes=1, max_doc_bytes=100_000, skips=skips))
    assert max(len(c.data) for c in chunks) < 100_000  # the giant line was never held whole
    docs = list(read_jsonl([str(path)], ReadOptions(max_doc_bytes=100_000), SkipLog()))
    assert [(d.line, d.record["text"]) for d in docs] == [(1, "first"), (3, "third"), (4, "fourth")]
    assert skips.places["too_large"] == [f"{path}:2: document larger than --max-doc-bytes (over 100000 bytes)"]


@pytest.mark.parametrize("newline_at", [0, 1, -1])
def test_giant_line_ending_on_a_read_block_boundary(tmp_path, newline_at):
    block = 1 << 16  # the reader's smallest read size
    first = b'{"text": "first"}\n'
    giant = b'{"text": "' + b"z" * (3 * block - len(first) - 12 + newline_at) + b'"}'
    path = tmp_path / "edge.jsonl"
    path.write_bytes(first + giant + b'\n{"text": "after"}\n{"text": "last"}')
    skips = SkipLog()
    docs = list(read_jsonl([str(path)], ReadOptions(max_doc_bytes=block), skips, chunk_bytes=block))
    assert [(d.line, d.record["text"]) for d in docs] == [(1, "first"), (3, "after"), (4, "last")]
    assert dict(skips.counts) == {"too_large": 1} and skips.places["too_large"][0].startswith(f"{path}:2:")


def _drop_long(doc):
    n = len(doc.record["text"])
    return Remove("long", f"{n} chars") if n > 600 else {**doc.record, "chars": n}


def test_order_and_output_identical_for_one_and_two_workers(tmp_path):
    path = tmp_path / "many.jsonl"
    lines = DATA.read_text().splitlines()
    path.write_text("\n".join(lines * 20) + "\n")  # 460 records, many small chunks
    outs = []
    for workers in (1, 2):
        job = JobConfig(input=[str(path)], workers=workers, chunk_bytes=3000, progress=False)
        summary = Summary("t", job)
        out, rej = tmp_path / f"out{workers}.jsonl", tmp_path / f"rej{workers}.jsonl"
        filter_job(_drop_long, job, ReadOptions(), summary, str(out), str(rej))
        outs.append((out.read_bytes(), rej.read_bytes(), summary.kept, dict(summary.removed)))
    assert outs[0] == outs[1]
    kept = [json.loads(x) for x in outs[0][0].splitlines()]
    expected = [json.loads(x) for x in lines * 20 if len(json.loads(x)["text"]) <= 600]
    assert [k["id"] for k in kept] == [e["id"] for e in expected]
    rejected = [json.loads(x)["_rejected"] for x in outs[0][1].splitlines()]
    assert rejected[0]["reason"] == "long" and rejected[0]["source"].endswith(":2")
    assert outs[0][2] + outs[0][3]["long"] == 460


def _explode(docs):
    if any(d.line > 300 for d in docs):
        raise RuntimeError("worker failed mid-run")
    return len(docs)


def test_a_failed_run_leaves_the_previous_output_untouched(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(DATA.read_text().splitlines() * 20) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text("previous good output\n")
    job = JobConfig(input=[str(path)], workers=2, chunk_bytes=3000, progress=False)
    with pytest.raises(ZeroDivisionError):
        filter_job(lambda d: d.record if d.line < 300 else 1 / 0, job, ReadOptions(), Summary("t"), str(out))
    assert out.read_text() == "previous good output\n"
    assert sorted(os.listdir(tmp_path)) == ["many.jsonl", "out.jsonl"]
    with pytest.raises(RuntimeError):
        list(map_chunks(_explode, job, ReadOptions(), Summary("t")))


def test_tool_summary_reports_kept_removed_and_skips(tmp_path):
    path = bad_file(tmp_path)
    out, summary_path = tmp_path / "out.jsonl", tmp_path / "summary.json"
    tool("filter")(["--input", str(path), "--output", str(out), "--max-doc-bytes", "4000",
                    "--min-words", "60", "--summary", str(summary_path), "--no-progress"])
    s = json.loads(summary_path.read_text())
    assert s["records"] == 2 and s["kept"] + sum(s["removed"].values()) == 2
    assert s["skipped"] == {k: len(v) for k, v in EXPECTED_SKIPS.items()}
    assert s["records"] + sum(s["skipped"].values()) == 11  # the file's 11 lines (the last unterminated)
    assert s["skipped_at"]["wrong_type"] == [f"{path}:9: field has the wrong type ('text' is int, not a string)"]


def test_list_flags_take_several_values_and_repeat(tmp_path):
    from megatron_qwen.data.corpus.runner import parse_args

    job_cls = runpy.run_path(str(REPO / "tools" / "decontaminate.py"), run_name="tool")["DecontaminateJob"]
    bench = tmp_path / "b.jsonl"
    bench.write_text('{"text": "x"}\n')
    cfg = parse_args(job_cls, ["--input", str(DATA), str(DATA), "--benchmark", f"a={bench}",
                               "--output", "o.jsonl", "--benchmark", f"b={bench}", "--text-key", "messages",
                               "--workers", "2"])
    assert cfg.job.input == [str(DATA), str(DATA)]
    assert cfg.decontaminate.benchmark == [f"a={bench}", f"b={bench}"]
    assert cfg.decontaminate.text_key == ["messages"] and cfg.job.workers == 2
    with pytest.raises(SystemExit, match="no such file"):
        parse_args(job_cls, ["--input", str(tmp_path / "missing.jsonl"), "--benchmark", str(bench), "--output", "o"])


def test_strict_error_from_a_worker_process(tmp_path):
    path = bad_file(tmp_path)
    job = JobConfig(input=[str(path)], workers=2, strict=True, progress=False)
    with pytest.raises(CorpusError, match=rf"^{path}:2: not valid JSON"):
        filter_job(lambda d: d.record, job, ReadOptions(), Summary("t"), str(tmp_path / "o.jsonl"))
    assert not list(tmp_path.glob("o.jsonl*"))


def test_sigterm_mid_run_removes_temporaries_and_keeps_old_output(tmp_path):
    import signal
    import time

    src = tmp_path / "big.jsonl"
    src.write_text(DATA.read_text() * 400)
    out = tmp_path / "out.jsonl"
    out.write_text("previous good output\n")
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "filter.py"), "--input", str(src),
                             "--output", str(out), "--workers", "2", "--chunk-bytes", "20000", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 60
    while not list(tmp_path.glob("out.jsonl.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: no output was written" in err
    assert out.read_text() == "previous good output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "out.jsonl"]


@pytest.mark.parametrize("gz", [False, True])
def test_a_byte_order_mark_does_not_cost_the_first_line(tmp_path, gz):
    data = b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n'
    path = tmp_path / ("bom.jsonl.gz" if gz else "bom.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    skips = SkipLog()
    docs = list(read_jsonl([str(path)], ReadOptions(), skips))
    assert [(d.line, d.record["text"]) for d in docs] == [(1, "first"), (2, "second")] and not skips.total


def test_outputs_commit_all_or_none_when_a_rename_fails(tmp_path):
    from megatron_qwen.data.corpus.runner import atomic_paths

    a, b = tmp_path / "data.bin", tmp_path / "data.idx"
    a.write_text("old bin")
    b.write_text("old idx")
    # the second rename fails for real (its temporary is gone): the first, already done, is undone
    with pytest.raises(CorpusError, match=rf"^{b}: cannot write .*no output was changed"):
        with atomic_paths(str(a), str(b)) as (ta, tb):
            Path(ta).write_text("new bin")
            Path(tb).write_text("new idx")
            os.unlink(tb)
    assert (a.read_text(), b.read_text()) == ("old bin", "old idx")
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx"]
    # a target that turned into a non-empty directory during the job: nothing replaced either
    b.unlink()
    with pytest.raises(CorpusError, match="is a directory"):
        with atomic_paths(str(a), str(b)) as (ta, tb):
            Path(ta).write_text("new bin")
            Path(tb).write_text("new idx")
            b.mkdir()
            (b / "f").write_text("x")
    assert a.read_text() == "old bin" and sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx"]
    # and when all renames work, both are new and no backup stays
    b.joinpath("f").unlink()
    b.rmdir()
    with atomic_paths(str(a), str(b)) as (ta, tb):
        Path(ta).write_text("new bin")
        Path(tb).write_text("new idx")
    assert (a.read_text(), b.read_text()) == ("new bin", "new idx")
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx"]


def test_aliased_outputs_are_refused_before_any_work(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(DATA.read_text())
    out = tmp_path / "out.jsonl"
    out.write_text("old output\n")
    (tmp_path / "link.jsonl").symlink_to(out)
    os.link(src, tmp_path / "hard.jsonl")
    cases = [(["--output", str(src)], "filter.output"),                            # the input itself
             (["--output", str(tmp_path / "hard.jsonl")], "filter.output"),         # a hard link of it
             (["--output", str(out), "--rejected", str(out)], "filter.rejected"),   # one file twice
             (["--output", str(out), "--rejected", str(tmp_path / "link.jsonl")], "filter.rejected"),
             (["--output", str(out), "--summary", str(out)], "job.summary")]
    for flags, name in cases:
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "filter.py"), "--input", str(src), *flags,
                               "--no-progress"], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 1, flags
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: {name}: ") and "is the same file as" in line, line
    assert out.read_text() == "old output\n" and src.read_text() == DATA.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.jsonl", "in.jsonl", "link.jsonl", "out.jsonl"]
