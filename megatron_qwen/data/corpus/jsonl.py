"""Read JSONL corpora as (file, line, record), counting every line that is skipped and where.

The driver process cuts input files into byte chunks of whole lines (``iter_chunks``: cheap, no
parsing, so it never becomes the bottleneck); whoever does the work, the driver itself or a
worker process or a Ray task, turns a chunk into records with ``parse_chunk``. A line is skipped,
never silently, when it is blank, not UTF-8, not JSON, has a key twice in one object (JSON
parsers would keep the last value without a word), is not an object, lacks a required field or
has it null, of the wrong type or empty, or is larger than ``max_doc_bytes``; each skip is
counted by reason in a ``SkipLog`` with its ``file:line``, so lines read = records + skipped,
exactly. With ``strict=True`` the first skip (blank lines apart) raises ``CorpusError`` instead.

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
import re
import zlib
from collections import Counter
from typing import Iterable, Iterator, Optional, Sequence

SKIP_REASONS = {
    "blank": "blank line",
    "invalid_utf8": "not valid UTF-8",
    "malformed_json": "not valid JSON",
    "duplicate_key": "a key appears twice in one object",
    "not_an_object": "not a JSON object",
    "missing_field": "required field missing",
    "null_field": "required field is null",
    "wrong_type": "field has the wrong type",
    "empty_text": "empty text",
    "too_large": "document larger than --max-doc-bytes",
}
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark at the start of a file is not part of line 1


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
    # parse with orjson when installed; the standard parser takes every line orjson rejects and
    # every line where the two could differ (``_same_as_stdlib``), so the records, what is
    # accepted and each skip's reason are those of the standard parser (tested)
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
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as exc:
        raise CorpusError(f"{path}: cannot open ({exc.strerror or exc})") from None


def _read(f, size: int, path: str, line_no: int) -> bytes:
    """``f.read(size)``; a broken input (truncated or non-gzip .gz, an I/O error) is one line."""
    try:
        return f.read(size)
    except (OSError, EOFError, zlib.error) as exc:
        what = "gzip " if path.endswith(".gz") else ""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CorpusError(f"{path}:{line_no}: unreadable {what}data ({reason})") from None


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
            first = True
            while True:
                block = _read(f, read_size, path, line_no)
                if first:
                    first = False
                    if block.startswith(BOM):
                        block = block[len(BOM):]
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
# orjson turns an integer outside 64 bits (20+ digits; 19 is the least that can overflow) into a
# float, and accepts nesting to depth 1023 where the standard parser's recursion limit stops sooner
_LONG_DIGITS = re.compile(rb"\d{19}")
_DEEP = 500  # containers nested deeper go to the standard parser


def _same_as_stdlib(record, raw: bytes) -> bool:
    """Whether orjson's ``record`` of ``raw`` is surely what the standard parser gives.

    One walk of the containers: too deep, or a float anywhere while ``raw`` has a run of 19
    digits (the float could be a wide integer), and it may not be. Plain records (strings and
    small integers) cost one look at each value; the digit scan runs only when there is a float.
    """
    floats = isinstance(record, float)
    stack = [(record, 1)] if isinstance(record, (dict, list)) else []
    while stack:
        value, depth = stack.pop()
        if depth > _DEEP:
            return False
        for v in value.values() if isinstance(value, dict) else value:
            if isinstance(v, float):
                floats = True
            elif isinstance(v, (dict, list)):
                stack.append((v, depth + 1))
    return not floats or _LONG_DIGITS.search(raw) is None


try:  # imported here, once in the driver, so forked workers inherit it (not once per worker)
    from orjson import dumps as _orjson_dumps, loads as _orjson_loads
except ImportError:
    _orjson_dumps = _orjson_loads = None


def parse_chunk(chunk: Chunk, opts: ReadOptions, skips: SkipLog) -> list:
    """The records of a chunk as ``Doc``s; bad lines go to ``skips`` (or raise when strict)."""
    docs = []
    required, limit, strict = opts.required_keys, opts.max_doc_bytes, opts.strict
    fast_loads = _orjson_loads if opts.fast_json else None
    lines = chunk.data.split(b"\n")
    if chunk.data.endswith(b"\n"):
        lines.pop()  # what follows the last newline is not a line
    for i, raw in enumerate(lines):
        line = chunk.first_line + i
        if not raw.strip():
            skips.add("blank", chunk.file, line)  # counted, never an error: not a record
            continue
        if limit and len(raw) > limit:
            skips.add("too_large", chunk.file, line, f"{len(raw)} bytes > {limit}", strict)
            continue
        record = _NOT_PARSED
        if fast_loads is not None:
            try:  # strict UTF-8, no lone surrogates: what it accepts needs no further check
                record = fast_loads(raw)
            except ValueError:
                pass
            if record is not _NOT_PARSED and not _same_as_stdlib(record, raw):
                record = _NOT_PARSED
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
        duplicate = duplicate_key(raw, record)
        if duplicate is not None:
            skips.add("duplicate_key", chunk.file, line, f"{duplicate!r}", strict)
            continue
        if not isinstance(record, dict):
            skips.add("not_an_object", chunk.file, line, type(record).__name__, strict)
            continue
        if not checked and (b"\\ud" in raw or b"\\uD" in raw) and not _encodable(record):
            skips.add("invalid_utf8", chunk.file, line, "a lone surrogate escape", strict)
            continue
        bad = None
        for key in required:
            bad = _field_problem(record, key, opts.strings)
            if bad:
                break
        if bad:
            skips.add(bad[0], chunk.file, line, bad[1], strict)
            continue
        docs.append(Doc(chunk.file, line, record))
    return docs


def _field_problem(record: dict, key: str, strings: bool) -> Optional[tuple]:
    """``(reason, detail)`` if ``record[key]`` is not a usable text, else None.

    Usable: a non-empty string; with ``strings=False`` also a list or object holding a string
    somewhere (chat messages).
    """
    if key not in record:
        return "missing_field", f"no {key!r}"
    value = record[key]
    if value is None:
        return "null_field", f"{key!r} is null"
    if isinstance(value, str):
        return None if value else ("empty_text", f"{key!r} is empty")
    kind = type(value).__name__
    if strings:
        return "wrong_type", f"{key!r} is {kind}, not a string"
    if not isinstance(value, (list, dict)):
        return "wrong_type", f"{key!r} is {kind}, not a string, list or object"
    if not value:
        return "empty_text", f"{key!r} is empty"
    if not any(True for _ in _strings(value)):
        return "wrong_type", f"{key!r} is a {kind} holding no string"
    return None


def _strings(value) -> Iterator[str]:
    """Every string in a JSON value, keys included."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            yield from v.keys()
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _encodable(record) -> bool:
    """No lone surrogate (from a ``\\ud800``-style escape) anywhere: the record can be written."""
    try:
        for s in _strings(record):
            s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def duplicate_key(raw: bytes, record) -> Optional[str]:
    """The first key that appears twice in one object of the line ``raw`` (parsed: ``record``).

    Exact, and cheap when there is none: outside strings every ``:`` of a JSON text separates
    one key from its value, so ``raw``'s colons = the pairs written + the colons inside string
    literals. Parsing keeps one pair per distinct key and drops the values of repeats, so with
    no repeat the colons equal keys + colons of the parsed strings, and with a repeat there are
    more. Only an escaped colon (``\\u003a``) breaks the count: then, as for naming the key,
    the line is parsed again with a hook that sees every pair.
    """
    keys, texts, stack = 0, [], [record]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            texts.append(v)
        elif isinstance(v, dict):
            keys += len(v)
            texts.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    raw_colons = raw.count(b":")
    if raw_colons == keys:  # colons >= pairs written >= distinct keys: no string colon, no repeat
        return None
    escaped = b"\\u003" in raw and (b"\\u003a" in raw or b"\\u003A" in raw)
    if not escaped and raw_colons == keys + sum(t.count(":") for t in texts):
        return None
    found: list = []

    def pairs(items: list) -> dict:
        obj = dict(items)
        if len(obj) < len(items) and not found:
            seen: set = set()
            found.append(next(k for k, _ in items if k in seen or seen.add(k)))
        return obj

    json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    return found[0] if found else None


def read_jsonl(paths: Iterable[str], opts: ReadOptions = ReadOptions(), skips: Optional[SkipLog] = None,
               chunk_bytes: int = 1 << 20) -> Iterator[Doc]:
    """All records of ``paths`` in order, in this process (the workers use ``parse_chunk``)."""
    skips = skips if skips is not None else SkipLog()
    for chunk in iter_chunks(list(paths), chunk_bytes, opts.max_doc_bytes, skips, opts.strict):
        yield from parse_chunk(chunk, opts, skips)


_FLAT = (str, int, bool, type(None))  # values orjson writes as the standard encoder does


def dump_line(record: dict) -> bytes:
    """One JSONL line, UTF-8, non-ASCII kept readable: ``json.dumps(record, ensure_ascii=False)``.

    A flat record (string keys; string, integer, bool or null values) is written field by field
    with orjson, which escapes every string and writes every 64-bit integer exactly as the
    standard encoder does (tested), at a fraction of its cost; anything else (floats, nesting,
    wider integers, lone surrogates) by the standard encoder.
    """
    if _orjson_dumps is not None and type(record) is dict:
        fields = []
        try:  # orjson's JSONEncodeError (an integer wider than 64 bits, a lone surrogate) is a TypeError
            for key, value in record.items():
                if type(key) is not str or type(value) not in _FLAT:
                    break
                fields.append(_orjson_dumps(key) + b": " + _orjson_dumps(value))
            else:
                return b"{" + b", ".join(fields) + b"}\n"
        except TypeError:
            pass
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def compact_line(values: list) -> bytes:
    """A JSON line that ``json.loads`` reads back as ``values`` exactly (work files, not output):
    orjson when every value is flat (see ``dump_line``), else the standard encoder."""
    if _orjson_dumps is not None and all(type(v) in _FLAT for v in values):
        try:
            return _orjson_dumps(values) + b"\n"
        except TypeError:  # an integer wider than 64 bits, a lone surrogate
            pass
    return (json.dumps(values, ensure_ascii=False) + "\n").encode("utf-8")
