"""Read JSONL corpora as (file, line, record), counting every line that is skipped and where.

The driver process cuts input files into byte chunks of whole lines (``iter_chunks``: cheap, no
parsing, so it never becomes the bottleneck); whoever does the work, the driver itself or a
worker process or a Ray task, turns a chunk into records with ``parse_chunk``. A line is skipped,
never silently, when it is not UTF-8, not JSON, not an object, lacks a required field, has an
empty text, or is larger than ``max_doc_bytes``; each skip is counted by reason in a ``SkipLog``
with its ``file:line``. With ``strict=True`` the first skip raises ``CorpusError`` instead.

    skips = SkipLog()
    for doc in read_jsonl(["a.jsonl"], ReadOptions(required_keys=("text",)), skips):
        print(doc.where, doc.record["text"][:40])
    print(skips.counts)
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections import Counter
from typing import Iterable, Iterator, Optional, Sequence

SKIP_REASONS = {
    "invalid_utf8": "not valid UTF-8",
    "malformed_json": "not valid JSON",
    "not_an_object": "not a JSON object",
    "missing_field": "required field missing",
    "wrong_type": "field has the wrong type",
    "empty_text": "empty text",
    "too_large": "document larger than --max-doc-bytes",
}


class CorpusError(Exception):
    """A corpus job that cannot go on; the message is one line naming the file, line or field."""


@dataclasses.dataclass(frozen=True)
class Doc:
    """One parsed input record and where it came from (``line`` is 1-based)."""

    file: str
    line: int
    record: dict

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """What makes a line a usable record."""

    required_keys: tuple = ("text",)  # must be present and non-empty
    strings: bool = True  # required fields must be strings (False: any JSON value, e.g. messages)
    max_doc_bytes: int = 8_000_000  # longer lines are skipped (0: no limit)
    strict: bool = False  # raise on the first skipped line instead of counting it
    # parse with orjson when installed, falling back to the standard parser on any line it
    # rejects (so what is accepted and each skip's reason are unchanged). orjson turns integers
    # beyond 64 bits into floats, so only for tools that never write records back (preprocess)
    fast_json: bool = False


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Whole lines of one file, starting at 1-based line ``first_line``."""

    file: str
    first_line: int
    data: bytes


class SkipLog:
    """Skipped lines: a count per reason and the first ``keep`` places (file:line: detail)."""

    def __init__(self, keep: int = 1000):
        self.keep = keep
        self.counts: Counter = Counter()
        self.places: dict = {}

    def add(self, reason: str, file: str, line: int, detail: str = "", strict: bool = False) -> None:
        text = f"{file}:{line}: {SKIP_REASONS.get(reason, reason)}" + (f" ({detail})" if detail else "")
        if strict:
            raise CorpusError(text)
        self.counts[reason] += 1
        places = self.places.setdefault(reason, [])
        if len(places) < self.keep:
            places.append(text)

    def merge(self, other: "SkipLog") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            places = self.places.setdefault(reason, [])
            places.extend(other.places.get(reason, [])[: max(0, self.keep - len(places))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __getstate__(self):
        return (self.keep, self.counts, self.places)

    def __setstate__(self, state):
        self.keep, self.counts, self.places = state


def _open_binary(path: str):
    if not os.path.isfile(path):
        raise CorpusError(f"{path}: no such input file")
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_chunks(paths: Sequence[str], chunk_bytes: int = 1 << 20, max_doc_bytes: int = 0,
                skips: Optional[SkipLog] = None, strict: bool = False) -> Iterator[Chunk]:
    """Cut files into chunks of whole lines of about ``chunk_bytes`` each, in input order.

    A line longer than ``max_doc_bytes`` is dropped here while streaming (so a giant line never
    sits in memory whole) and counted in ``skips`` as ``too_large``.
    """
    skips = skips if skips is not None else SkipLog()
    read_size = max(1 << 16, chunk_bytes)
    for path in paths:
        line_no = 1  # number of the first line in ``pending``
        pending = b""
        oversized_from = 0  # >0: skipping a giant line that started at this line number
        with _open_binary(path) as f:
            while True:
                block = f.read(read_size)
                eof = not block
                if oversized_from:
                    if eof:
                        skips.add("too_large", path, oversized_from, f"over {max_doc_bytes} bytes", strict)
                        break
                    cut = block.find(b"\n")
                    if cut < 0:
                        continue
                    skips.add("too_large", path, oversized_from, f"over {max_doc_bytes} bytes", strict)
                    oversized_from = 0
                    line_no += 1
                    block = block[cut + 1 :]
                if eof:
                    if pending:
                        yield Chunk(path, line_no, pending)
                    break
                data = pending + block
                cut = data.rfind(b"\n")
                if cut < 0:
                    pending = data
                    if max_doc_bytes and len(pending) > max_doc_bytes:
                        pending, oversized_from = b"", line_no
                    continue
                whole, pending = data[: cut + 1], data[cut + 1 :]
                yield Chunk(path, line_no, whole)
                line_no += whole.count(b"\n")
                if max_doc_bytes and len(pending) > max_doc_bytes:
                    pending, oversized_from = b"", line_no


_NOT_PARSED = object()


def _orjson_loads():
    try:
        import orjson
    except ImportError:
        return None
    return orjson.loads


def parse_chunk(chunk: Chunk, opts: ReadOptions, skips: SkipLog) -> list:
    """The records of a chunk as ``Doc``s; bad lines go to ``skips`` (or raise when strict)."""
    docs = []
    required, limit, strict = opts.required_keys, opts.max_doc_bytes, opts.strict
    fast_loads = _orjson_loads() if opts.fast_json else None
    for i, raw in enumerate(chunk.data.split(b"\n")):
        if not raw.strip():
            continue  # blank lines (and the end of the chunk) are not records
        line = chunk.first_line + i
        if limit and len(raw) > limit:
            skips.add("too_large", chunk.file, line, f"{len(raw)} bytes > {limit}", strict)
            continue
        record = _NOT_PARSED
        if fast_loads is not None:
            try:  # strict UTF-8, no lone surrogates: what it accepts needs no further check
                record = fast_loads(raw)
            except ValueError:
                pass
        checked = record is not _NOT_PARSED
        if not checked:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                skips.add("invalid_utf8", chunk.file, line, f"byte {exc.start}", strict)
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                skips.add("malformed_json", chunk.file, line, f"{exc.msg}, column {exc.colno}", strict)
                continue
            except RecursionError:
                skips.add("malformed_json", chunk.file, line, "nested too deeply", strict)
                continue
        if not isinstance(record, dict):
            skips.add("not_an_object", chunk.file, line, type(record).__name__, strict)
            continue
        bad = None
        for key in required:
            value = record.get(key)
            if value is None:
                bad = ("missing_field", f"no {key!r}")
            elif opts.strings and not isinstance(value, str):
                bad = ("wrong_type", f"{key!r} is {type(value).__name__}, not a string")
            elif not value:
                bad = ("empty_text", f"{key!r} is empty")
            elif not checked and isinstance(value, str) and (b"\\ud" in raw or b"\\uD" in raw):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    bad = ("invalid_utf8", f"{key!r} has a lone surrogate escape")
            if bad:
                break
        if bad:
            skips.add(bad[0], chunk.file, line, bad[1], strict)
            continue
        docs.append(Doc(chunk.file, line, record))
    return docs


def read_jsonl(paths: Iterable[str], opts: ReadOptions = ReadOptions(), skips: Optional[SkipLog] = None,
               chunk_bytes: int = 1 << 20) -> Iterator[Doc]:
    """All records of ``paths`` in order, in this process (the workers use ``parse_chunk``)."""
    skips = skips if skips is not None else SkipLog()
    for chunk in iter_chunks(list(paths), chunk_bytes, opts.max_doc_bytes, skips, opts.strict):
        yield from parse_chunk(chunk, opts, skips)


def dump_line(record: dict) -> bytes:
    """One JSONL line, UTF-8, non-ASCII kept readable."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
