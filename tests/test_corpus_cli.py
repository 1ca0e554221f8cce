"""The corpus tools' command lines under bad outputs, broken inputs, a missing dependency: one
line naming the path, exit status 1, no traceback, old outputs intact, no temporary left; and
the accounting: lines read = kept + removed + skipped, exactly, for every tool."""

import gzip
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
DATA = REPO / "tests" / "data" / "multilingual.jsonl"


def _cli_cases(cases: list, tmp_path: Path) -> list:
    """Run ``[(tool, argv), ...]`` in one interpreter (tests/scripts/corpus_cli_cases.py)."""
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([[str(TOOLS / f"{tool}.py"), [str(a) for a in argv]] for tool, argv in cases]))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "corpus_cli_cases.py"), str(spec)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _tool_args(tool: str, out: Path, src: Path, bench: Path) -> list:
    if tool == "preprocess_data":
        return ["--input", src, "--output-prefix", out, "--no-progress"]
    if tool == "extend_vocab":
        return ["--corpus", src, "--output", out, "--num-new-tokens", 2]
    flags = {"dedup_exact": ["--method", "exact"], "dedup_minhash": ["--method", "minhash"],
             "decontaminate": ["--benchmark", f"b={bench}"]}.get(tool, [])
    return ["--input", src, "--output", out, "--no-progress", *flags]


TOOL_NAMES = ["filter", "extract_text", "decontaminate", "dedup_exact", "dedup_minhash", "preprocess_data",
              "extend_vocab"]


def test_bad_outputs_and_broken_inputs_are_one_line_for_every_tool(tmp_path):
    # before: tracebacks for all of these (an unwritable directory even "succeeded" for root
    # until the rename), and preprocess replaced the .bin while the .idx rename failed
    work = tmp_path / "w"
    work.mkdir()
    src = work / "in.jsonl"
    src.write_text(DATA.read_text())
    bench = work / "bench.jsonl"
    bench.write_text('{"text": "a benchmark question that is long enough to index"}\n')
    outdir = work / "outdir"
    outdir.mkdir()
    (outdir / "keep").write_text("x")
    (work / "afile").write_text("a file, not a directory")
    whole = gzip.compress(DATA.read_bytes())
    (work / "trunc.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (work / "notgz.jsonl.gz").write_bytes(DATA.read_bytes())
    # preprocess: an old pair whose .idx target is now a non-empty directory
    (work / "pp_text_document.bin").write_bytes(b"old bin")
    (work / "pp_text_document.idx").mkdir()
    (work / "pp_text_document.idx" / "keep").write_text("x")
    # filter: an old output, and --rejected a non-empty directory
    (work / "old.jsonl").write_text("old output\n")
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}

    cases, expect = [], []
    unwritable = Path("/proc/corpus_test_out.jsonl")  # /proc takes no new files, even from root
    for tool in TOOL_NAMES:
        name = tool.split("_")[0] if tool.startswith("dedup") else tool
        bad_outputs = [(outdir, "is a directory"), (work / "afile" / "out.jsonl", "is not a directory")]
        if os.path.isdir("/proc"):
            bad_outputs.append((unwritable, "cannot create files in /proc"))
        for out, says in bad_outputs:
            if tool == "preprocess_data":  # the prefix names two files
                out = work / "pp" if out == outdir else Path(str(out).removesuffix(".jsonl"))
                says = "is a directory" if out == work / "pp" else says
            cases.append((name, _tool_args(tool, out, src, bench)))
            expect.append((tool, str(out), says, True))
        for broken, says in ((work / "trunc.jsonl.gz", "unreadable gzip data"),
                             (work / "notgz.jsonl.gz", "unreadable gzip data (Not a gzipped file")):
            out = work / ("pp2" if tool == "preprocess_data" else "out.jsonl")
            cases.append((name, _tool_args(tool, out, broken, bench)))
            expect.append((tool, str(broken), says, False))
    cases.append(("filter", ["--input", src, "--output", work / "old.jsonl", "--rejected", outdir, "--no-progress"]))
    expect.append(("filter --rejected", str(outdir), "filter.rejected: ", True))
    # an empty corpus: megatron-core cannot read an empty .bin (before: the files were written,
    # and reading them gave a ValueError and two AttributeError tracebacks)
    for i, text in enumerate(["", "\n  \n{oops\n"]):
        (work / f"empty{i}.jsonl").write_text(text)
        before[work / f"empty{i}.jsonl"] = text.encode()
        cases.append(("preprocess_data", ["--input", work / f"empty{i}.jsonl", "--output-prefix", work / "pe",
                                          "--no-progress"]))
        expect.append(("preprocess_data empty", str(work / f"empty{i}.jsonl"), "no usable record", False))

    for (tool, path, says, first), result in zip(expect, _cli_cases(cases, tmp_path)):
        lines = [ln for ln in result["output"].splitlines() if not ln.startswith(("benchmark ", "corpus: "))]
        assert result["rc"] == 1 and len(lines) == 1, (tool, path, result)
        assert lines[0].startswith("error: ") and path in lines[0] and says in lines[0], (tool, lines[0])
        if first:  # a bad output is found before any work: nothing else was printed
            assert result["output"].count("\n") == 1, (tool, result["output"])
    after = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert after == before  # old outputs intact, nothing new: no .tmp-PID, .old-PID or probe file
    assert not os.path.exists(unwritable)


def test_a_missing_dependency_stops_extraction_instead_of_removing_every_page(tmp_path):
    # simulate lxml_html_clean being absent (trafilatura -> justext -> lxml.html.clean needs it)
    fake = tmp_path / "site"
    (fake / "lxml_html_clean").mkdir(parents=True)
    (fake / "lxml_html_clean" / "__init__.py").write_text(
        'raise ImportError("simulated: lxml_html_clean is not installed")\n')
    pages = [(REPO / "tests" / "data" / "page_en.html").read_text(), "<html><body><nav>Home</nav></body></html>",
             "<html><body>junk</body></html>"]
    src = tmp_path / "pages.jsonl"
    src.write_text("".join(json.dumps({"html": p}) + "\n" for p in pages))
    out = tmp_path / "out.jsonl"
    out.write_text("old output\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(TOOLS / "extract_text.py"), "--input", str(src), "--output", str(out),
                           "--no-progress"], capture_output=True, text=True, cwd=REPO, env=env)
    # before: exit 0 with all three pages removed as extract_error
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: trafilatura cannot run here (ImportError: lxml.html.clean module is now a "
                           "separate project lxml_html_clean.") and line.endswith("no output was written")
    assert out.read_text() == "old output\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out.jsonl", "pages.jsonl", "site"]


def _accounting_input(path: Path) -> int:
    """20 lines: a BOM on line 1, blank and whitespace-only lines, a null text, a duplicate key."""
    texts = [json.loads(x)["text"] for x in DATA.read_text().splitlines()][:14]
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in enumerate(texts)]
    lines[3:3] = ["", "   \t"]
    lines[9:9] = ['{"id": "n", "text": null}', '{"id": "d", "text": "one", "text": "two"}', ""]
    lines.append(json.dumps({"id": "copy", "text": texts[0]}))  # a duplicate for dedup
    data = b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(data)
    return data.count(b"\n")  # what `wc -l` says


@pytest.mark.parametrize("tool", ["filter", "extract_text", "decontaminate", "dedup_exact", "dedup_minhash",
                                  "preprocess_data"])
def test_lines_read_equal_kept_removed_and_skipped(tmp_path, tool):
    # before: blank lines were not counted (a 20-line file read as 17 lines), the null text was
    # "missing_field", the duplicate key silently took the last value, and the BOM cost line 1
    src = tmp_path / "in.jsonl"
    wc_l = _accounting_input(src)
    assert wc_l == 20
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"text": json.loads(DATA.read_text().splitlines()[5])["text"]}) + "\n")
    summary = tmp_path / "s.json"
    name = tool.split("_")[0] if tool.startswith("dedup") else tool
    argv = _tool_args(tool, tmp_path / "out.jsonl", src, bench) + ["--summary", summary, "--no-progress"]
    if tool == "extract_text":
        argv.append("--no-extract")
    sys_argv = sys.argv
    try:
        sys.argv = [name, *map(str, argv)]  # dedup's main reads sys.argv
        runpy.run_path(str(TOOLS / f"{name}.py"), run_name="tool")["main"]()
    finally:
        sys.argv = sys_argv
    s = json.loads(summary.read_text())
    assert s["kept"] + sum(s["removed"].values()) + sum(s["skipped"].values()) == wc_l, s
    assert s["skipped"] == {"blank": 3, "null_field": 1, "duplicate_key": 1}
    assert s["skipped_at"]["duplicate_key"] == [f"{src}:11: a key appears twice in one object ('text')"]
    assert s["records"] == 15 and not any(p.startswith(f"{src}:1:") for v in s["skipped_at"].values() for p in v)
