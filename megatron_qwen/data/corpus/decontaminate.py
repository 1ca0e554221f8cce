"""Remove training samples that share an n-gram (13 by default) with a benchmark's test set.

Text is normalised (Unicode NFKC, case-folded, punctuation dropped) and cut into tokens: words,
or single characters for Chinese/Japanese, which have no spaces. Each token is hashed once
(xxh3, 64 bits) and every n-gram's hash is a polynomial of its token hashes computed for all
windows at once with numpy (wrapping uint64 arithmetic), so a document costs a few vector
operations, not one string join per window. A benchmark item shorter than n tokens (a short
question) is matched whole if it has at least ``min_ngram`` tokens; shorter ones are counted and
ignored, since they would match everywhere.

Each removal names the benchmark (the reason ``benchmark:NAME`` in the summary) and, in the
rejected file, the overlapping n-gram and the benchmark record it came from.
"""

from __future__ import annotations

import dataclasses
import os
import re
import unicodedata
from collections import Counter
from typing import Iterator, Optional

import numpy as np
import xxhash

from megatron_qwen.config import ConfigError
from megatron_qwen.data.corpus.filters import CJK_CHAR
from megatron_qwen.data.corpus.jsonl import Doc, ReadOptions, SkipLog, read_jsonl
from megatron_qwen.data.corpus.runner import Remove

_TOKENS = re.compile(f"[{CJK_CHAR}]|[^\\W{CJK_CHAR}]+")
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the n-gram polynomial


@dataclasses.dataclass
class DecontaminateConfig:
    """Which benchmarks, which fields, which n."""

    output: str = ""  # JSONL of kept samples
    rejected: Optional[str] = None  # JSONL of removed samples with the benchmark and the n-gram hit
    text_key: list = dataclasses.field(default_factory=lambda: ["text"])  # sample fields (strings, or
    # lists/dicts such as chat messages: every string inside is checked)
    benchmark: list = dataclasses.field(default_factory=list)  # NAME=PATH.jsonl, repeatable
    benchmark_key: list = dataclasses.field(default_factory=lambda: ["text"])  # benchmark fields used
    ngram: int = 13  # a sample sharing an n-gram this long (tokens) with a benchmark is removed
    min_ngram: int = 8  # benchmark items shorter than this many tokens are not matched

    def validate(self) -> None:
        for name in ("text_key", "benchmark_key", "benchmark"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if not self.output:
            raise ConfigError("decontaminate.output: give the output JSONL (--output FILE)")
        if not self.benchmark:
            raise ConfigError("decontaminate.benchmark: give at least one --benchmark NAME=PATH.jsonl")
        for spec in self.benchmark:
            path = spec.partition("=")[2] or spec
            if not os.path.isfile(path):
                raise ConfigError(f"decontaminate.benchmark: {path}: no such file")
        if not 1 <= self.min_ngram <= self.ngram:
            raise ConfigError(f"decontaminate.min_ngram={self.min_ngram} must be in [1, ngram={self.ngram}]")


def tokens_of(text: str) -> list:
    """Normalised tokens: NFKC, case-folded words without punctuation, CJK characters alone."""
    return _TOKENS.findall(unicodedata.normalize("NFKC", text).casefold())


def ngram_hashes(tokens: list, n: int) -> np.ndarray:
    """The 64-bit hash of every n-token window (empty if fewer than n tokens)."""
    if len(tokens) < n:
        return np.empty(0, np.uint64)
    h = np.fromiter((xxhash.xxh3_64_intdigest(t.encode("utf-8")) for t in tokens), np.uint64, len(tokens))
    windows = len(tokens) - n + 1
    out = h[:windows].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            out = out * _BASE + h[j : j + windows]
    return out


def strings_in(value) -> Iterator[str]:
    """Every string inside a JSON value (a text, or chat messages as lists of dicts)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)


@dataclasses.dataclass
class BenchmarkIndex:
    """Sorted unique n-gram hashes of all benchmark items, each with the item that first held it.

    12 bytes per n-gram (a uint64 hash and an int32 item number), so even large test sets ship
    cheaply to every worker.
    """

    ngram: int
    hashes: np.ndarray  # uint64, sorted, unique
    owners: np.ndarray  # int32: index into ``sources`` of the first item holding each hash
    sources: list  # (benchmark name, file:line) per indexed item
    lengths: tuple  # window sizes to test: ngram, plus the lengths of shorter whole items
    items: Counter  # items indexed per benchmark
    too_short: Counter  # texts ignored per benchmark (fewer than min_ngram tokens)
    skips: SkipLog

    def lookup(self, hashes: np.ndarray) -> Optional[tuple]:
        """``(position in hashes, (name, where))`` of the first hash in the index, or None."""
        if not hashes.size or not self.hashes.size:
            return None
        pos = np.minimum(np.searchsorted(self.hashes, hashes), self.hashes.size - 1)
        found = np.flatnonzero(self.hashes[pos] == hashes)
        if not found.size:
            return None
        i = int(found[0])
        return i, self.sources[int(self.owners[pos[i]])]


def build_index(cfg: DecontaminateConfig) -> BenchmarkIndex:
    chunks, owner_chunks, sources = [], [], []
    lengths = {cfg.ngram}
    items, too_short, skips = Counter(), Counter(), SkipLog()
    read = ReadOptions(required_keys=(), max_doc_bytes=0)
    for spec in cfg.benchmark:
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = os.path.basename(spec).split(".")[0], spec
        for doc in read_jsonl([path], read, skips):
            texts = [s for k in cfg.benchmark_key if k in doc.record for s in strings_in(doc.record[k])]
            if not texts:
                skips.add("missing_field", doc.file, doc.line, f"none of {', '.join(cfg.benchmark_key)}")
                continue
            items[name] += 1
            for text in texts:
                tokens = tokens_of(text)
                if len(tokens) < cfg.min_ngram:
                    too_short[name] += 1
                    continue
                n = min(cfg.ngram, len(tokens))
                lengths.add(n)
                hashes = ngram_hashes(tokens, n)
                chunks.append(hashes)
                owner_chunks.append(np.full(hashes.size, len(sources), np.int32))
            sources.append((name, doc.where))
    all_hashes = np.concatenate(chunks) if chunks else np.empty(0, np.uint64)
    all_owners = np.concatenate(owner_chunks) if owner_chunks else np.empty(0, np.int32)
    hashes, first = np.unique(all_hashes, return_index=True)  # first: the earliest item wins
    return BenchmarkIndex(cfg.ngram, hashes, all_owners[first], sources,
                          tuple(sorted(lengths, reverse=True)), items, too_short, skips)


class Decontaminator:
    """``decide`` for the runner: the sample, or a Remove naming the benchmark it overlaps."""

    def __init__(self, cfg: DecontaminateConfig, index: BenchmarkIndex):
        self.keys = list(cfg.text_key)
        self.index = index

    def match(self, text: str) -> Optional[tuple]:
        """``(benchmark, where, ngram_text)`` of the first overlap of ``text``, or None."""
        tokens = tokens_of(text)
        for n in self.index.lengths:
            hit = self.index.lookup(ngram_hashes(tokens, n))
            if hit:
                i, (name, where) = hit
                return name, where, " ".join(tokens[i : i + n])
        return None

    def __call__(self, doc: Doc):
        for key in self.keys:
            for text in strings_in(doc.record.get(key)):
                hit = self.match(text)
                if hit:
                    name, where, gram = hit
                    return Remove(f"benchmark:{name}", f"shares {gram!r} with {where}")
        return doc.record
