"""HTML extraction (trafilatura) and language id (py3langid's shipped model) on real pages."""

import json
import runpy
from pathlib import Path

import pytest

from megatron_qwen.data.corpus.extract import ExtractConfig, html_to_text
from megatron_qwen.data.corpus.langid import identify

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
DOCS = {d["id"]: d["text"] for d in map(json.loads, (DATA / "multilingual.jsonl").read_text().splitlines())}


def test_main_text_without_boilerplate():
    text = html_to_text((DATA / "page_en.html").read_text(), ExtractConfig(output="x"))
    assert DOCS["en-2"] in text and DOCS["en-3"] in text
    for boilerplate in ("cookies", "Privacy", "Related posts", "dataLayer", "addEventListener", "About us"):
        assert boilerplate not in text
    zh = html_to_text((DATA / "page_zh.html").read_text(), ExtractConfig(output="x"))
    assert DOCS["zh-0"] in zh and "版权所有" not in zh and "首页" not in zh


def test_python_docs_page_if_installed():
    import idlelib

    page = Path(idlelib.__file__).parent / "help.html"  # IDLE's manual, shipped with CPython
    if not page.is_file():
        pytest.skip("this Python ships without idlelib/help.html")
    text = html_to_text(page.read_text(encoding="utf-8"), ExtractConfig(output="x"))
    assert "IDLE is Python’s Integrated Development and Learning Environment" in text
    assert "<" not in text[:2000] and identify(text)[0] == "en"


@pytest.mark.parametrize("doc, lang", [("en-5", "en"), ("zh-1", "zh"), ("mixed-0", "ja"), ("ko-0", "en")])
def test_language_id(doc, lang):
    code, score = identify(DOCS[doc])
    assert code == lang and 0.0 <= score <= 1.0


def test_tool_adds_fields_filters_languages_and_counts(tmp_path):
    pages = [{"url": "https://example.org/qwen", "html": (DATA / "page_en.html").read_text()},
             {"url": "https://example.org/great-wall", "html": (DATA / "page_zh.html").read_text()},
             {"url": "https://example.org/empty", "html": "<html><body><nav>Home</nav></body></html>"},
             {"url": "https://example.org/missing"}]
    src = tmp_path / "pages.jsonl"
    src.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pages))
    out, rej, summary = tmp_path / "out.jsonl", tmp_path / "rej.jsonl", tmp_path / "s.json"
    main = runpy.run_path(str(REPO / "tools" / "extract_text.py"), run_name="tool")["main"]
    main(["--input", str(src), "--output", str(out), "--rejected", str(rej), "--languages", "en,ja",
          "--min-chars", "20", "--summary", str(summary), "--no-progress"])
    (kept,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert kept["url"] == pages[0]["url"] and "html" not in kept
    assert kept["lang"] == "en" and kept["lang_score"] > 0.9 and DOCS["en-2"] in kept["text"]
    s = json.loads(summary.read_text())
    assert s["removed"] == {"lang_zh": 1, "no_text": 1}
    assert s["skipped_at"]["missing_field"] == [f"{src}:4: required field missing (no 'html')"]
    reasons = [json.loads(x)["_rejected"]["reason"] for x in rej.read_text().splitlines()]
    assert reasons == ["lang_zh", "no_text"]
    # --no-extract: language id only, on text that is already there
    main(["--input", str(DATA / "multilingual.jsonl"), "--output", str(out), "--no-extract", "--no-progress"])
    langs = {r["id"]: r["lang"] for r in map(json.loads, out.read_text().splitlines())}
    assert langs["zh-0"] == "zh" and langs["en-3"] == "en" and len(langs) == len(DOCS)
