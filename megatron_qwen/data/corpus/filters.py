"""Rule-based quality filters: Gopher's (Rae et al. 2021, appendix A), with CJK variants.

None of C4's rules (line-level terminal punctuation, "javascript", "lorem ipsum", curly braces,
bad words) is implemented.

Each rule measures one property of a document and removes it past a threshold; the first rule a
document fails (in the order of ``RULES``) is its removal reason, so removals are counted per
rule. Every threshold is a field of ``FilterConfig`` (a flag, or the ``filter:`` group of a YAML
recipe); ``--disable RULE ...`` switches rules off.

Chinese and Japanese are not written with spaces, so for a CJK document (its ``lang`` field is
zh/ja, or else most of its letters are CJK) a "word" is one Han/kana character (Latin runs stay
words): lengths count characters, the stop words are Chinese function characters, the n-gram
rules use character n-grams with their own n and thresholds, and the mean-word-length and
alphabetic-word rules, which mean nothing for single characters, are skipped. The stop-word
rule has lists for English and CJK; a record whose ``lang`` is another language skips it.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Optional

from megatron_qwen.config import ConfigError
from megatron_qwen.data.corpus.jsonl import Doc
from megatron_qwen.data.corpus.runner import Remove, split_commas

CJK_CHAR = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK = re.compile(f"[{CJK_CHAR}]")
_CJK_TOKENS = re.compile(f"[{CJK_CHAR}]|[^\\s{CJK_CHAR}]+")
PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»‘’“”…–—·•，。、；：？！（）【】《》「」『』〈〉"
BULLETS = ("•", "-", "*", "·", "‣", "◦", "▪", "●", "–", "—", "○", "■", "►", "✓", "➢")
ELLIPSES = ("...", "…", "。。。")

RULES = (
    "doc_length", "mean_word_length", "symbol_ratio", "bullet_lines", "ellipsis_lines",
    "alpha_words", "stop_words", "duplicate_lines", "duplicate_paragraphs", "top_ngram",
    "duplicate_ngrams",
)


@dataclasses.dataclass
class FilterConfig:
    """Thresholds of the quality rules (Gopher's values by default)."""

    output: str = ""  # JSONL of kept records
    rejected: Optional[str] = None  # JSONL of removed records, each with "_rejected": {reason, detail}
    text_key: str = "text"  # JSONL field with the text
    lang_key: str = "lang"  # if a record has it (see extract_text.py), zh/ja select the CJK rules
    cjk_ratio: float = 0.3  # without a lang field: CJK if this share of letters are Han/kana
    disable: list = dataclasses.field(default_factory=list)  # rule names to skip
    min_words: int = 50  # fewest words a document may have
    max_words: int = 100_000  # most words a document may have
    min_cjk_chars: int = 100  # CJK documents: length in Han/kana characters (+ Latin words)
    max_cjk_chars: int = 200_000  # CJK documents: most Han/kana characters
    min_mean_word_length: float = 3.0  # shortest mean word length (characters)
    max_mean_word_length: float = 10.0  # longest mean word length (characters)
    max_symbol_word_ratio: float = 0.1  # ("#" + ellipses) per word
    max_bullet_lines_ratio: float = 0.9  # lines starting with a bullet
    max_ellipsis_lines_ratio: float = 0.3  # lines ending with an ellipsis
    min_alpha_words_ratio: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # occurrences of stop words, at least
    stop_words: list = dataclasses.field(  # English stop words counted by min_stop_words
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    cjk_stop_words: list = dataclasses.field(  # CJK stop characters counted by min_stop_words
        default_factory=lambda: ["的", "了", "是", "在", "和", "有", "不", "这", "也", "就", "我", "他", "与"])
    max_duplicate_lines_ratio: float = 0.3  # repeated lines / lines
    max_duplicate_line_chars_ratio: float = 0.2  # characters in repeated lines / characters
    max_duplicate_paragraphs_ratio: float = 0.3  # repeated paragraphs / paragraphs
    max_duplicate_paragraph_chars_ratio: float = 0.2  # characters in repeated paragraphs / characters
    top_ngram_max_ratio: dict = dataclasses.field(  # n -> max share of characters in the top n-gram
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    dup_ngram_max_ratio: dict = dataclasses.field(  # n -> max share of characters in repeated n-grams
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    cjk_top_ngram_max_ratio: dict = dataclasses.field(  # character n-grams for CJK documents
        default_factory=lambda: {3: 0.20, 5: 0.18, 7: 0.16})
    cjk_dup_ngram_max_ratio: dict = dataclasses.field(  # CJK: n -> max share in repeated n-grams
        default_factory=lambda: {10: 0.15, 12: 0.14, 14: 0.13, 16: 0.12, 18: 0.11, 20: 0.10})

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("filter.output: give the output JSONL (--output FILE)")
        self.disable = split_commas(self.disable)
        unknown = sorted(set(self.disable) - set(RULES))
        if unknown:
            raise ConfigError(f"filter.disable: unknown rule(s) {', '.join(unknown)}; rules: {', '.join(RULES)}")
        for name in ("top_ngram_max_ratio", "dup_ngram_max_ratio", "cjk_top_ngram_max_ratio",
                     "cjk_dup_ngram_max_ratio"):
            table = getattr(self, name)
            if not isinstance(table, dict) or not all(str(n).isdigit() and int(n) > 0 for n in table):
                raise ConfigError(f"filter.{name} must map n-gram sizes to ratios, e.g. {{2: 0.2}}")
            setattr(self, name, {int(n): float(v) for n, v in table.items()})


def is_cjk(text: str, lang: Optional[str], ratio: float) -> bool:
    if lang:
        return lang in ("zh", "ja")
    letters = sum(1 for ch in text if ch.isalpha())
    return bool(letters) and len(_CJK.findall(text)) / letters >= ratio


def words_of(text: str, cjk: bool) -> list:
    """Normalised words (case-folded, edge punctuation removed); CJK characters are words."""
    raw = _CJK_TOKENS.findall(text) if cjk else text.split()
    out = []
    for w in raw:
        w = w.strip(PUNCT).lower()
        if w:
            out.append(w)
    return out


def duplicate_fraction(items: list) -> tuple:
    """(repeated items / items, characters in repeated items / characters); first copies count once."""
    seen, dup_n, dup_chars, total = set(), 0, 0, 0
    for item in items:
        total += len(item)
        if item in seen:
            dup_n += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return (dup_n / len(items) if items else 0.0), (dup_chars / total if total else 0.0)


def top_ngram_fraction(words: list, n: int, total_chars: int) -> float:
    """Share of characters taken by the most frequent word n-gram."""
    if len(words) < n or not total_chars:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / total_chars


def duplicate_ngram_fraction(words: list, n: int, total_chars: int) -> float:
    """Share of characters in n-grams that repeat an earlier n-gram (non-overlapping scan)."""
    if len(words) < n or not total_chars:
        return 0.0
    seen, dup, i = set(), 0, 0
    lengths = [len(w) for w in words]
    while i <= len(words) - n:
        gram = tuple(words[i : i + n])
        if gram in seen:
            dup += sum(lengths[i : i + n])
            i += n
        else:
            seen.add(gram)
            i += 1
    return dup / total_chars


class QualityFilter:
    """``decide`` for the runner: the record if it passes every enabled rule, else a Remove."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.enabled = [r for r in RULES if r not in set(cfg.disable)]

    def __call__(self, doc: Doc):
        text = doc.record[self.cfg.text_key]
        lang = doc.record.get(self.cfg.lang_key)
        failure = self.check(text, lang if isinstance(lang, str) else None)
        return Remove(*failure) if failure else doc.record

    def check(self, text: str, lang: Optional[str] = None) -> Optional[tuple]:
        """``(rule, detail)`` of the first rule ``text`` fails, or None if it passes."""
        cfg = self.cfg
        cjk = is_cjk(text, lang, cfg.cjk_ratio)
        words = words_of(text, cjk)
        n_words = len(words)
        total_chars = sum(map(len, words))
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        for rule in self.enabled:
            if rule == "doc_length":
                lo, hi, unit = ((cfg.min_cjk_chars, cfg.max_cjk_chars, "CJK characters + words") if cjk
                                else (cfg.min_words, cfg.max_words, "words"))
                if n_words < lo:
                    return rule, f"{n_words} {unit} < {lo}"
                if n_words > hi:
                    return rule, f"{n_words} {unit} > {hi}"
            elif rule == "mean_word_length" and not cjk and n_words:
                mean = total_chars / n_words
                if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
                    return rule, (f"mean word length {mean:.2f} outside "
                                  f"[{cfg.min_mean_word_length}, {cfg.max_mean_word_length}]")
            elif rule == "symbol_ratio" and n_words:
                symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES[:2])
                if symbols / n_words > cfg.max_symbol_word_ratio:
                    return rule, f"{symbols} symbols / {n_words} words > {cfg.max_symbol_word_ratio}"
            elif rule == "bullet_lines" and lines:
                share = sum(ln.startswith(BULLETS) for ln in lines) / len(lines)
                if share > cfg.max_bullet_lines_ratio:
                    return rule, f"{share:.2f} of lines are bullets > {cfg.max_bullet_lines_ratio}"
            elif rule == "ellipsis_lines" and lines:
                share = sum(ln.endswith(ELLIPSES) for ln in lines) / len(lines)
                if share > cfg.max_ellipsis_lines_ratio:
                    return rule, f"{share:.2f} of lines end with an ellipsis > {cfg.max_ellipsis_lines_ratio}"
            elif rule == "alpha_words" and not cjk and n_words:
                share = sum(any(c.isalpha() for c in w) for w in words) / n_words
                if share < cfg.min_alpha_words_ratio:
                    return rule, f"{share:.2f} of words have a letter < {cfg.min_alpha_words_ratio}"
            elif rule == "stop_words" and (cjk or not lang or lang == "en"):  # lists: English, CJK
                if cjk:
                    found = sum(text.count(w) for w in cfg.cjk_stop_words)
                else:
                    stop = set(cfg.stop_words)
                    found = sum(w in stop for w in words)
                if found < cfg.min_stop_words:
                    return rule, f"{found} stop words < {cfg.min_stop_words}"
            elif rule == "duplicate_lines" and lines:
                share, chars = duplicate_fraction(lines)
                if share > cfg.max_duplicate_lines_ratio:
                    return rule, f"{share:.2f} of lines repeat > {cfg.max_duplicate_lines_ratio}"
                if chars > cfg.max_duplicate_line_chars_ratio:
                    return rule, f"{chars:.2f} of characters in repeated lines > {cfg.max_duplicate_line_chars_ratio}"
            elif rule == "duplicate_paragraphs":
                paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
                share, chars = duplicate_fraction(paragraphs)
                if share > cfg.max_duplicate_paragraphs_ratio:
                    return rule, f"{share:.2f} of paragraphs repeat > {cfg.max_duplicate_paragraphs_ratio}"
                if chars > cfg.max_duplicate_paragraph_chars_ratio:
                    return rule, (f"{chars:.2f} of characters in repeated paragraphs > "
                                  f"{cfg.max_duplicate_paragraph_chars_ratio}")
            elif rule == "top_ngram":
                table = cfg.cjk_top_ngram_max_ratio if cjk else cfg.top_ngram_max_ratio
                for n, limit in sorted(table.items()):
                    share = top_ngram_fraction(words, n, total_chars)
                    if share > limit:
                        return rule, f"top {n}-gram holds {share:.2f} of characters > {limit}"
            elif rule == "duplicate_ngrams":
                table = cfg.cjk_dup_ngram_max_ratio if cjk else cfg.dup_ngram_max_ratio
                for n, limit in sorted(table.items()):
                    share = duplicate_ngram_fraction(words, n, total_chars)
                    if share > limit:
                        return rule, f"repeated {n}-grams hold {share:.2f} of characters > {limit}"
        return None
