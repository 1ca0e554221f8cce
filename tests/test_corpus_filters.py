"""Quality filters: each rule fires on a real text that has the defect it targets, good English,
Chinese, Korean and code pass, thresholds come from flags or YAML, removals are counted per rule."""

import hashlib
import json
import os
import re
import runpy
from pathlib import Path

import pytest

from megatron_qwen.data.corpus.filters import (
    RULES, FilterConfig, QualityFilter, duplicate_ngram_fraction, is_cjk, words_of,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "multilingual.jsonl"
DOCS = {d["id"]: d["text"] for d in map(json.loads, DATA.read_text().splitlines())}
SENTS = re.split(r"(?<=[.!?]) ", DOCS["en-2"] + " " + DOCS["en-3"])
CITIES = ("北京 上海 天津 重庆 广州 深圳 杭州 南京 苏州 成都 武汉 西安 长沙 郑州 济南 青岛 大连 沈阳 长春 哈尔滨 "
          "昆明 贵阳 南宁 福州 厦门 合肥 南昌 太原 石家庄 兰州 西宁 银川 乌鲁木齐 拉萨 海口 三亚 珠海 佛山 "
          "东莞 无锡 宁波 温州 绍兴 扬州 徐州 洛阳 开封 桂林").split()


def checksums() -> str:
    """A real checksum listing (sha256 of stdlib files): long tokens, few letters."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))[:60]
    return "\n".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in files)


# text -> the rule it must fail first (None: passes every rule)
CASES = {
    "english paragraph": (DOCS["en-2"], None),
    "one sentence": ("Qwen is a comprehensive language model series that encompasses distinct models.", "doc_length"),
    "checksum listing": (checksums(), "mean_word_length"),
    "hashtag post": (" ".join(SENTS[:3]) + " #LLM #AI #Qwen #NLP #deeplearning #opensource #MachineLearning "
                     "#transformers #RLHF #chatbots #agents #coding #math #benchmarks", "symbol_ratio"),
    "bullet list": ("\n".join(f"• {s}" for s in SENTS), "bullet_lines"),
    "teaser page": ("\n".join(s[: len(s) // 2].rstrip() + "..." for s in SENTS), "ellipsis_lines"),
    "numbers table": ("Table 2: Overall performance on widely-used benchmarks. Model Params MMLU C-Eval GSM8K "
                      "MATH HumanEval MBPP BBH MPT 7B 30.8 23.5 9.1 3.0 18.3 22.8 35.6 30B 47.9 - 15.2 3.1 25.0 "
                      "32.8 38.0 Falcon 7B 27.8 - 6.8 2.3 - 11.2 28.0 40B 57.0 - 19.6 5.5 - 29.8 37.1 ChatGLM2 "
                      "6B 47.9 51.7 32.4 6.5 - - 33.7 InternLM 7B 51.0 53.4 31.2 6.3 10.4 14.0 37.0 20B 62.1 "
                      "58.8 52.6 7.9 25.6 35.6 52.5", "alpha_words"),
    "author list": (DOCS["en-0"], "stop_words"),
    "repeated lines": ("\n".join(s for s in SENTS[:6] for _ in range(2)), "duplicate_lines"),
    "keyword spam": (" ".join(["cheap flights to beijing"] * 3 + SENTS[:2]
                              + ["cheap flights", "book cheap flights now", "cheap flights cheap flights"] * 8),
                     "top_ngram"),
    "pasted twice": (DOCS["en-3"] + " " + DOCS["en-3"][: len(DOCS["en-3"]) // 2], "duplicate_ngrams"),
    "chinese paragraph": (DOCS["zh-0"], None),
    "chinese short": (DOCS["zh-1"][:60], "doc_length"),
    "chinese city list": ("，".join(CITIES), "stop_words"),
    "chinese pasted twice": (DOCS["zh-2"] + DOCS["zh-2"][: len(DOCS["zh-2"]) // 2], "duplicate_ngrams"),
    "korean notes": (DOCS["ko-0"], None),
    "python source": (DOCS["code-0"], None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_rule_fires_on_its_defect(name):
    text, expected = CASES[name]
    failure = QualityFilter(FilterConfig(output="x")).check(text)
    assert (failure[0] if failure else None) == expected, failure


def test_every_rule_is_exercised():
    assert {rule for _, rule in CASES.values()} | {"duplicate_paragraphs"} >= set(RULES)


def test_duplicate_paragraphs_and_disabling_a_rule():
    text = "\n\n".join([DOCS["en-2"], DOCS["en-3"], DOCS["en-2"]])
    assert QualityFilter(FilterConfig(output="x")).check(text)[0] == "duplicate_lines"
    failure = QualityFilter(FilterConfig(output="x", disable=["duplicate_lines"])).check(text)
    assert failure == ("duplicate_paragraphs", "0.33 of paragraphs repeat > 0.3")


def test_chinese_is_measured_in_characters():
    zh = DOCS["zh-0"]
    assert is_cjk(zh, None, 0.3) and not is_cjk(DOCS["en-2"], None, 0.3) and not is_cjk(DOCS["ko-0"], None, 0.3)
    words = words_of(zh, cjk=True)
    assert words[:4] == ["长", "城", "是", "中"] and "，" not in words
    assert len(words) == len(re.findall(r"[\u4e00-\u9fff]", zh))
    # the lang field, when present, overrides the script guess
    assert is_cjk("plain english words", "zh", 0.3) and not is_cjk(zh, "en", 0.3)
    limit = FilterConfig(output="x", max_cjk_chars=len(words) - 1)
    assert QualityFilter(limit).check(zh)[0] == "doc_length"


def test_stop_words_apply_to_english_and_cjk_only():
    italian = ("Dovresti specificare un motivo per questa certificazione. A seconda del contesto hai la "
               "possibilità di scegliere da questa lista: la chiave è stata compromessa, la chiave è stata "
               "sostituita, la chiave non è più usata, l'identificativo utente non è più valido. Scrivi "
               "qui sotto una descrizione del motivo, se vuoi, e premi invio per confermare la scelta.")
    f = QualityFilter(FilterConfig(output="x"))
    assert f.check(italian)[0] == "stop_words"  # no lang field: judged as English
    assert f.check(italian, lang="it") is None
    assert f.check(DOCS["en-0"], lang="en")[0] == "stop_words"


def test_duplicate_ngram_fraction_counts_only_repeats():
    words = "a b c d e f g a b c d e".split()
    # the second "a b c d e" repeats the first: 5 of 12 characters
    assert duplicate_ngram_fraction(words, 5, len(words)) == pytest.approx(5 / 12)
    assert duplicate_ngram_fraction(words, 6, len(words)) == 0.0


def test_tool_counts_per_rule_with_yaml_and_flag_thresholds(tmp_path):
    src = tmp_path / "in.jsonl"
    with src.open("w") as f:
        for name, (text, _) in CASES.items():
            f.write(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n")
    recipe = tmp_path / "filters.yaml"
    recipe.write_text("filter:\n  min_words: 120\n  disable: [symbol_ratio]\n  dup_ngram_max_ratio: {5: 0.5}\n")
    out, rej, summary = tmp_path / "out.jsonl", tmp_path / "rej.jsonl", tmp_path / "s.json"
    main = runpy.run_path(str(REPO / "tools" / "filter.py"), run_name="tool")["main"]
    main(["--config", str(recipe), "--input", str(src), "--output", str(out), "--rejected", str(rej),
          "--min-words", "100", "--summary", str(summary), "--no-progress", "--workers", "2"])
    cfg = FilterConfig(output="x", min_words=100, disable=["symbol_ratio"], dup_ngram_max_ratio={5: 0.5})
    expected = {}
    for name, (text, _) in CASES.items():
        failure = QualityFilter(cfg).check(text)
        expected[name] = failure[0] if failure else None
    assert expected["hashtag post"] is None  # disabled by the YAML
    assert expected["pasted twice"] is None  # threshold raised by the YAML
    s = json.loads(summary.read_text())
    removed = {}
    for reason in expected.values():
        if reason:
            removed[reason] = removed.get(reason, 0) + 1
    assert s["removed"] == removed
    kept = [json.loads(x)["name"] for x in out.read_text().splitlines()]
    assert kept == [n for n, r in expected.items() if r is None]
    for line in rej.read_text().splitlines():
        rec = json.loads(line)
        assert rec["_rejected"]["reason"] == expected[rec["name"]] and rec["_rejected"]["detail"]


def test_unknown_rule_is_a_one_line_error(tmp_path):
    main = runpy.run_path(str(REPO / "tools" / "filter.py"), run_name="tool")["main"]
    with pytest.raises(SystemExit, match="unknown rule.*stop_word"):
        main(["--input", str(DATA), "--output", str(tmp_path / "o.jsonl"), "--disable", "doc_length,stop_word"])
