"""HTML to text with trafilatura, and the language of the text, as fields on each record.

``ExtractConfig`` is the ``extract`` group of ``tools/extract_text.py``; ``Extractor`` is the
per-record function the shared runner sends to the workers (plain settings, so it pickles).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_qwen.config import ConfigError
from megatron_qwen.data.corpus.jsonl import CorpusError, Doc
from megatron_qwen.data.corpus.langid import identify
from megatron_qwen.data.corpus.runner import Remove, split_commas


@dataclasses.dataclass
class ExtractConfig:
    """What to extract, where to write it, which languages to keep."""

    output: str = ""  # JSONL of kept records, with text, lang, lang_score
    rejected: Optional[str] = None  # JSONL of removed records with the reason
    html_key: str = "html"  # input field holding the page
    text_key: str = "text"  # output field for the extracted text (input field with --no-extract)
    extract: bool = True  # --no-extract: the text is already there, only identify the language
    keep_html: bool = False  # keep the HTML field in the output record
    include_tables: bool = True  # trafilatura: keep table text
    include_comments: bool = False  # trafilatura: keep the comment section of a page
    favor_precision: bool = False  # trafilatura: drop borderline boilerplate (less text, cleaner)
    min_chars: int = 1  # extracted text shorter than this is removed (reason no_text)
    languages: list = dataclasses.field(default_factory=list)  # keep only these ISO codes (empty: all)
    min_lang_score: float = 0.0  # remove records whose language probability is lower
    langid_chars: int = 4000  # characters scored by the language model (0: all)

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("extract.output: give the output JSONL (--output FILE)")
        self.languages = split_commas(self.languages)
        if not 0.0 <= self.min_lang_score <= 1.0:
            raise ConfigError(f"extract.min_lang_score={self.min_lang_score} must be in [0, 1]")

    @property
    def input_key(self) -> str:
        return self.html_key if self.extract else self.text_key


def html_to_text(html: str, cfg: ExtractConfig) -> Optional[str]:
    """The main text of a page (boilerplate, menus and scripts removed), or None."""
    import trafilatura

    return trafilatura.extract(
        html, output_format="txt", include_tables=cfg.include_tables,
        include_comments=cfg.include_comments, favor_precision=cfg.favor_precision,
        deduplicate=False, with_metadata=False,
    )


# failures of the machine, not of a page: they stop the run instead of removing every document
ENVIRONMENT_ERRORS = (ImportError, MemoryError, OSError)


def _environment_error(exc: BaseException) -> CorpusError:
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    return CorpusError(f"trafilatura cannot run here ({reason}); no output was written")


class Extractor:
    """``decide`` for the runner: the record with text/lang/lang_score, or a Remove.

    A page trafilatura cannot parse is removed and counted (``extract_error``); a missing or
    broken dependency (``ENVIRONMENT_ERRORS``) is a ``CorpusError`` that stops the run: found
    at construction, in the driver, before any work, or at the first page that needs it.
    """

    def __init__(self, cfg: ExtractConfig):
        self.cfg = cfg
        if cfg.extract:
            try:
                import trafilatura  # noqa: F401
            except ENVIRONMENT_ERRORS as exc:
                raise _environment_error(exc) from None

    def __call__(self, doc: Doc):
        cfg, record = self.cfg, dict(doc.record)
        if cfg.extract:
            try:
                text = html_to_text(record[cfg.html_key], cfg) or ""
            except ENVIRONMENT_ERRORS as exc:
                raise _environment_error(exc) from None
            except Exception as exc:  # a page lxml/trafilatura cannot parse is counted, not fatal
                return Remove("extract_error", f"{type(exc).__name__}: {str(exc)[:200]}")
            if not cfg.keep_html:
                del record[cfg.html_key]
        else:
            text = record[cfg.text_key]
        text = text.strip()
        if len(text) < cfg.min_chars:
            return Remove("no_text", f"{len(text)} characters extracted")
        lang, score = identify(text, cfg.langid_chars)
        if cfg.languages and lang not in cfg.languages:
            return Remove(f"lang_{lang}", f"{lang} ({score}) not in {','.join(cfg.languages)}")
        if score < cfg.min_lang_score:
            return Remove("lang_score", f"{lang} {score} < {cfg.min_lang_score}")
        record[cfg.text_key] = text
        record["lang"], record["lang_score"] = lang, score
        return record
