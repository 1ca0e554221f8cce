"""Language identification with py3langid's model, which ships inside its wheel (no download).

Probabilities are normalised (``lang_score`` in [0, 1]). Only the first ``max_chars`` characters
are scored: the language of a web page is settled long before its end, and scoring is linear.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, max_chars: int = 4000) -> tuple:
    """``(iso_639_1_code, probability)`` of ``text``'s language, e.g. ``("zh", 0.99)``."""
    lang, score = _identifier().classify(text[:max_chars] if max_chars else text)
    return lang, round(float(score), 4)
