"""Corpus deduplication: exact (after normalisation) and fuzzy (MinHash + LSH).

Both keep the first occurrence in input order, so the output does not depend on ``--workers`` or
``--ray``, and both write a report JSONL with one line per removed document naming the document
it duplicates. They run on the shared corpus runner (``runner.map_chunks``): the per-document
work (normalise + hash, shingle + sign) runs in workers, the driver only does what needs the
whole corpus (the set of seen hashes; LSH banding and union-find).

Exact: one pass. Each record's text is normalised (``normalize_for_exact``) and hashed with
xxh3-128; a hash seen before marks a duplicate of the record that first had it.

MinHash: pass 1 computes signatures in the workers ([n_docs, num_perm], 4 bytes a value with the
default scheme). The driver bands them (``minhash.lsh_clusters``): per band one sort of 64-bit
band keys; the candidate pairs feed a union-find (connected components); the first document of
each cluster survives. With ``--verify`` a candidate pair only counts when the true Jaccard of
its shingle sets reaches ``--threshold``: an extra pass re-shingles only the candidate documents.
A last pass writes the kept records (and, with ``--removed``, the removed ones).

Scaling past memory: ``--partitions P`` (``run_partitioned``, ``partitioned.py``) keeps every
per-document structure on disk and gives the same outputs, byte for byte. In memory, signatures
are ``num_perm * 4`` bytes a document (0.5 KB at 128), so 100M
documents are 50 GB. ``--bands-per-pass K`` bands K bands at a time and folds their unions into
one root per document before the next pass, so candidate pairs never pile up across bands; on a
cluster, the signatures of pass 1 can be written per shard and each pass reads only its band's
columns (``band_edges`` needs nothing else), giving a memory bound of one band of keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import unicodedata
from typing import Iterator, Optional

import numpy as np
import regex
import xxhash

from megatron_qwen.config import ConfigError
from megatron_qwen.data.corpus import minhash, partitioned
from megatron_qwen.data.corpus.jsonl import CorpusError, ReadOptions, dump_line
from megatron_qwen.data.corpus.runner import (
    JobConfig, Remove, Summary, same_file, atomic_paths, check_job_paths, map_chunks, write_filtered,
)

METHODS = ("exact", "minhash")


@dataclasses.dataclass
class DedupConfig:
    """What to deduplicate and how (``tools/dedup.py``)."""

    method: str = "minhash"  # exact | minhash
    output: Optional[str] = None  # kept records, JSONL, in input order
    report: Optional[str] = None  # one line per removed record (default: OUTPUT.duplicates.jsonl)
    removed: Optional[str] = None  # also write the removed records themselves here
    text_key: str = "text"  # JSONL field with the text
    id_key: str = "id"  # copied into the report when present
    # MinHash
    shingle: str = "auto"  # words | chars | auto (chars for CJK text, per document)
    ngram: int = 5  # words per shingle
    char_ngram: int = 5  # characters per shingle
    num_perm: int = 128  # MinHash permutations (signature length)
    threshold: float = 0.8  # Jaccard similarity that makes a duplicate
    bands: Optional[int] = None  # with rows: fixed LSH shape; else chosen from threshold
    rows: Optional[int] = None  # with bands: rows per LSH band
    false_positive_weight: float = 0.5  # weights of the bands/rows choice
    false_negative_weight: float = 0.5  # weights of the bands/rows choice
    verify: bool = False  # keep only candidate pairs whose true Jaccard >= threshold
    scheme: str = "affine32"  # affine32 | affine64 | mersenne (see minhash.py)
    seed: int = 1  # seed of the MinHash permutations
    bands_per_pass: Optional[int] = None  # band this many bands per pass (bounds memory)
    # Bounded memory at any corpus size (partitioned.py).
    partitions: Optional[int] = None  # keep dedup state on disk in this many partitions (bounded memory)
    work_dir: Optional[str] = None  # where (default: beside --output); removed at the end

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"dedup.method={self.method!r}: choose exact or minhash")
        if not self.output:
            raise ConfigError("dedup.output: give the output JSONL (--output FILE)")
        if self.shingle not in minhash.SHINGLE_KINDS:
            raise ConfigError(f"dedup.shingle={self.shingle!r}: choose words, chars or auto")
        if self.scheme not in minhash.SCHEMES:
            raise ConfigError(f"dedup.scheme={self.scheme!r}: choose one of {', '.join(minhash.SCHEMES)}")
        for name in ("ngram", "char_ngram", "num_perm"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dedup.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"dedup.threshold={self.threshold} must be between 0 and 1")
        if (self.bands is None) != (self.rows is None):
            raise ConfigError("dedup.bands and dedup.rows go together (or give neither and use --threshold)")
        if self.bands is not None:
            if self.bands < 1 or self.rows < 1:
                raise ConfigError(f"dedup.bands={self.bands}, dedup.rows={self.rows} must be >= 1")
            if self.bands * self.rows > self.num_perm:
                raise ConfigError(f"dedup.bands x rows = {self.bands * self.rows} exceeds num_perm={self.num_perm}")
        if self.bands_per_pass is not None and self.bands_per_pass < 1:
            raise ConfigError(f"dedup.bands_per_pass={self.bands_per_pass} must be >= 1")
        if self.partitions is not None:
            if self.partitions < 1:
                raise ConfigError(f"dedup.partitions={self.partitions} must be >= 1")
            if self.bands_per_pass is not None:
                raise ConfigError("dedup.bands_per_pass: the in-memory path's bound; --partitions replaces it")
        elif self.work_dir is not None:
            raise ConfigError("dedup.work_dir: only used with --partitions P")
        if min(self.false_positive_weight, self.false_negative_weight) < 0 or \
                self.false_positive_weight + self.false_negative_weight <= 0:
            raise ConfigError("dedup.false_positive_weight/false_negative_weight must be >= 0, not both 0")
        if self.report is None:
            self.report = f"{self.output}.duplicates.jsonl"

    def band_shape(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        return minhash.optimal_bands_rows(self.threshold, self.num_perm, self.false_positive_weight,
                                          self.false_negative_weight)


@dataclasses.dataclass
class DedupToolConfig:
    """Exact or MinHash-LSH dedup of JSONL corpora, keeping the first occurrence."""

    job: JobConfig = dataclasses.field(default_factory=JobConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)

    def validate(self) -> None:
        # records are identified by (file, line): a file given twice would have its second copy
        # kept by exact dedup and, by MinHash, both copies removed
        for i, path in enumerate(self.job.input):
            for j in range(i):
                if same_file(path, self.job.input[j]):
                    raise ConfigError(f"job.input: {path} is given twice (as input {j + 1} and {i + 1}; "
                                      f"dedup identifies records by file and line)")
        dd = self.dedup
        check_job_paths(self.job, {"dedup.output": dd.output, "dedup.report": dd.report,
                                   "dedup.removed": dd.removed})


# --------------------------------------------------------------------------- exact

_PUNCT = regex.compile(r"\p{P}+")
_DIGIT = regex.compile(r"\d")  # any Unicode decimal digit


def normalize_for_exact(text: str) -> str:
    """NFKC, case folding, punctuation removed, digits to 0, whitespace runs to one space."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _DIGIT.sub("0", _PUNCT.sub("", text))
    return " ".join(text.split())


def exact_key(text: str) -> bytes:
    """The 128-bit identity of a text for exact dedup."""
    return xxhash.xxh3_128_digest(normalize_for_exact(text).encode("utf-8"))


class DedupSummary(Summary):
    """The runner's summary plus facts that are not rates (LSH shape, pair and cluster counts)."""

    def __init__(self, tool: str, job: Optional[JobConfig] = None):
        super().__init__(tool, job)
        self.facts: dict = {}

    def as_dict(self) -> dict:
        return {**super().as_dict(), **self.facts}

    def report(self, places: int = 10) -> str:
        lines = [super().report(places)]
        lines += [f"  {key:16s} {value:>12,}" for key, value in self.facts.items()]
        return "\n".join(lines)


class _ExactWork:
    """Worker side of exact dedup: (file, line, id, key, serialised record) per record."""

    def __init__(self, text_key: str, id_key: str):
        self.text_key, self.id_key = text_key, id_key

    def __call__(self, docs):
        return [(doc.file, doc.line, doc.record.get(self.id_key), exact_key(doc.record[self.text_key]),
                 dump_line(doc.record)) for doc in docs]


def _read_options(dd: DedupConfig) -> ReadOptions:
    """orjson where it gives the standard parser's records (``fast_json``): the same bytes out."""
    return ReadOptions(required_keys=(dd.text_key,), fast_json=True)


def _place(file: str, line: int, ident) -> dict:
    out = {"file": file, "line": line}
    if ident is not None:
        out["id"] = ident
    return out


def run_exact(cfg: DedupToolConfig) -> Summary:
    """One pass: keep a record unless its normalised text was seen earlier in the input."""
    job, dd = cfg.job, cfg.dedup
    summary = DedupSummary("dedup exact", job)
    read = _read_options(dd)
    seen: dict = {}
    paths = (dd.output, dd.report) + ((dd.removed,) if dd.removed else ())
    with atomic_paths(*paths) as tmps:
        files = [open(t, "wb") for t in tmps]
        try:
            for results in map_chunks(_ExactWork(dd.text_key, dd.id_key), job, read, summary):
                for file, line, ident, key, data in results:
                    first = seen.setdefault(key, (file, line, ident))
                    if first[:2] == (file, line):
                        files[0].write(data)
                        summary.kept += 1
                        continue
                    summary.removed["exact_duplicate"] += 1
                    files[1].write(dump_line({**_place(file, line, ident),
                                              "duplicate_of": _place(*first), "method": "exact"}))
                    if dd.removed:
                        record = json.loads(data)
                        record["_rejected"] = {"reason": "exact_duplicate", "source": f"{file}:{line}",
                                              "detail": f"duplicate of {first[0]}:{first[1]}"}
                        files[2].write(dump_line(record))
        finally:
            for f in files:
                f.close()
    summary.facts["unique_texts"] = len(seen)
    return summary


# --------------------------------------------------------------------------- minhash


class _SignWork:
    """Worker side of MinHash pass 1: where each record is, and its signature."""

    def __init__(self, dd: DedupConfig):
        self.text_key, self.id_key = dd.text_key, dd.id_key
        self.spec = minhash.ShingleSpec(dd.shingle, dd.ngram, dd.char_ngram)
        self.params = (dd.num_perm, dd.seed, dd.scheme)
        self._hasher = None
        minhash.build_tables()  # here in the driver: forked workers inherit them

    def __getstate__(self):
        return {**self.__dict__, "_hasher": None}

    def __call__(self, docs):
        if self._hasher is None:
            self._hasher = minhash.MinHasher(*self.params)
        places = [(doc.file, doc.line, doc.record.get(self.id_key)) for doc in docs]
        hashes, counts = minhash.shingle_batch([doc.record[self.text_key] for doc in docs], self.spec)
        return places, self._hasher.signatures(hashes, counts)


class _ShingleWork:
    """Worker side of the --verify pass: the shingle sets of the wanted records only."""

    def __init__(self, dd: DedupConfig, wanted: frozenset):
        self.text_key = dd.text_key
        self.spec = minhash.ShingleSpec(dd.shingle, dd.ngram, dd.char_ngram)
        self.wanted = wanted
        minhash.build_tables()

    def __call__(self, docs):
        hits = [(doc.file, doc.line, doc.record[self.text_key]) for doc in docs
                if (doc.file, doc.line) in self.wanted]
        if not hits:
            return []
        hashes, counts = minhash.shingle_batch([t for _, _, t in hits], self.spec)
        parts = np.split(hashes, np.cumsum(counts)[:-1])
        return [(f, line, np.unique(p)) for (f, line, _), p in zip(hits, parts)]


class _KeepUnlisted:
    """``write_filtered`` decision of the last pass: drop the records listed as duplicates."""

    def __init__(self, removed: dict):
        self.removed = removed  # (file, line) -> detail

    def __call__(self, doc):
        detail = self.removed.get((doc.file, doc.line))
        return doc.record if detail is None else Remove("near_duplicate", detail)


def run_minhash(cfg: DedupToolConfig) -> Summary:
    """Signatures (workers) -> LSH bands + union-find (driver) -> [verify pass] -> write pass."""
    job, dd = cfg.job, cfg.dedup
    bands, rows = dd.band_shape()
    summary = DedupSummary("dedup minhash", job)
    read = _read_options(dd)
    places, sigs = [], []
    for chunk_places, chunk_sigs in map_chunks(_SignWork(dd), job, read, summary):
        places += chunk_places
        sigs.append(chunk_sigs)
    dtype = np.uint32 if dd.scheme == "affine32" else np.uint64
    sigs = np.concatenate(sigs) if sigs else np.empty((0, dd.num_perm), dtype=dtype)
    summary.close()

    shingles: dict = {}  # doc index -> unique shingle hashes (candidates only, with --verify)

    def load(indices) -> None:
        missing = [int(i) for i in indices if int(i) not in shingles]
        if not missing:
            return
        index_of = {places[i][:2]: i for i in missing}
        quiet = dataclasses.replace(job, progress=False)
        for hits in map_chunks(_ShingleWork(dd, frozenset(index_of)), quiet, read, Summary("verify")):
            for file, line, hashes in hits:
                shingles[index_of[(file, line)]] = hashes

    def verify(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        load(np.unique(np.concatenate([src, dst])))
        return np.array([minhash.jaccard(shingles[s], shingles[d]) >= dd.threshold
                         for s, d in zip(src.tolist(), dst.tolist())], dtype=bool)

    result = minhash.lsh_clusters(sigs, bands, rows, dd.bands_per_pass, verify if dd.verify else None)
    root = result.root
    dup = np.flatnonzero(root != np.arange(len(root)))
    estimates = minhash.estimated_jaccard(sigs[dup], sigs[root[dup]]) if len(dup) else np.empty(0)
    if dd.verify:
        load(np.concatenate([dup, root[dup]]))
    sizes = np.bincount(root, minlength=len(root))
    removed = {}
    final = DedupSummary("dedup minhash (write)", job)
    paths = (dd.report, dd.output) + ((dd.removed,) if dd.removed else ())
    with atomic_paths(*paths) as tmps:  # the report, the output and the removed: one commit
        with open(tmps[0], "wb") as f:
            for i, est in zip(dup.tolist(), estimates.tolist()):
                r = int(root[i])
                entry = {**_place(*places[i]), "duplicate_of": _place(*places[r]), "cluster": r,
                         "cluster_size": int(sizes[r]), "method": "minhash",
                         "estimated_jaccard": round(est, 4)}
                if dd.verify:
                    entry["jaccard"] = round(minhash.jaccard(shingles[i], shingles[r]), 4)
                f.write(dump_line(entry))
                removed[places[i][:2]] = f"duplicate of {places[r][0]}:{places[r][1]}"
        write_filtered(_KeepUnlisted(removed), job, read, final, *tmps[1:])
    final.close()
    summary.kept, summary.removed = final.kept, final.removed
    summary.facts.update(bands=bands, rows=rows, candidate_pairs=result.candidate_pairs,
                         clusters=int(np.count_nonzero(sizes > 1)))
    if dd.verify:
        summary.facts["verified_pairs"] = result.verified_pairs
    return summary


@contextlib.contextmanager
def _one_ray_runtime(job: JobConfig):
    """MinHash reads the input up to three times; with --ray, start Ray once for all passes
    (the runner joins a runtime that is already up instead of starting its own)."""
    if not job.ray:
        yield
        return
    import ray

    if job.ray == "local":
        ray.init(num_cpus=job.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=job.ray, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- partitioned


class _PartitionSignWork:
    """Worker side of the partitioned pass 1: places, and exact keys or signatures + bucket records."""

    def __init__(self, dd: DedupConfig, inputs: list):
        self.exact = dd.method == "exact"
        self.text_key, self.id_key = dd.text_key, dd.id_key
        self.sign = None if self.exact else _SignWork(dd)
        self.bands, self.rows = (0, 0) if self.exact else dd.band_shape()
        self.index = {path: i for i, path in enumerate(inputs)} if dd.verify and not self.exact else None

    def __call__(self, docs):
        blob, lengths = partitioned.places_blob(docs, self.id_key)
        where = (blob, lengths, None if self.index is None else _line_keys(docs, self.index))
        if self.exact:
            keys = np.frombuffer(b"".join(exact_key(d.record[self.text_key]) for d in docs), dtype="<u8")
            rec = np.empty(len(docs), dtype=partitioned.EXACT)
            rec["k1"], rec["k2"], rec["pos"] = keys[0::2], keys[1::2], np.arange(len(docs))
            return where, rec, None
        _, sigs = self.sign(docs)
        active = np.flatnonzero(~np.all(sigs == np.iinfo(sigs.dtype).max, axis=1))
        rec = np.empty(len(active) * self.bands, dtype=partitioned.BUCKET)
        for band in range(self.bands):
            part = rec[band * len(active) : (band + 1) * len(active)]
            part["band"], part["pos"] = band, active
            part["key"] = minhash.band_keys(sigs[active], band, self.rows)
        return where, rec, sigs


def _line_keys(docs, index: dict) -> np.ndarray:
    return np.array([(index[d.file] << partitioned.LINE_BITS) | d.line for d in docs], dtype=np.int64)


class _WantedShingles:
    """Worker side of the partitioned --verify pass: unique shingles of the wanted records, by rank."""

    def __init__(self, dd: DedupConfig, inputs: list, work: str):
        self.text_key = dd.text_key
        self.spec = minhash.ShingleSpec(dd.shingle, dd.ngram, dd.char_ngram)
        self.index = {path: i for i, path in enumerate(inputs)}
        self.path = os.path.join(work, "wanted_keys.bin")
        minhash.build_tables()

    def __call__(self, docs):
        # mapped per chunk, not once per worker: a map's touched pages stay in the worker's RSS
        # while it lives, which over a whole pass would be the whole (corpus-sized) file
        size = os.path.getsize(self.path)
        wanted = np.memmap(self.path, dtype="<i8", mode="r") if size else np.empty(0, np.int64)
        keys = _line_keys(docs, self.index)
        ranks = np.searchsorted(wanted, keys)
        hit = ranks < len(wanted)
        hit[hit] = wanted[ranks[hit]] == keys[hit]
        del wanted
        picked = np.flatnonzero(hit)
        hashes, counts = minhash.shingle_batch([docs[i].record[self.text_key] for i in picked], self.spec)
        sets = [np.unique(p) for p in np.split(hashes, np.cumsum(counts)[:-1])] if len(picked) else []
        return ranks[picked], sets


class _LineWork:
    """Worker side of the partitioned write pass: where each record is, and its JSONL line."""

    def __init__(self, id_key: str):
        self.id_key = id_key

    def __call__(self, docs):
        return [(doc.file, doc.line, doc.record.get(self.id_key), dump_line(doc.record)) for doc in docs]


def _duplicates(work: str, parts: int) -> Iterator[tuple]:
    """(position, root, cluster size, estimated and true Jaccard) of each duplicate, in input order."""
    for part in partitioned.iter_duplicates(work, parts):
        for lo in range(0, len(part), 1 << 16):
            yield from zip(*(part[k][lo : lo + (1 << 16)].tolist() for k in ("pos", "root", "size", "est", "jac")))


def run_partitioned(cfg: DedupToolConfig) -> Summary:
    """Exact or MinHash dedup whose memory does not grow with the corpus (``partitioned.py``)."""
    job, dd = cfg.job, cfg.dedup
    parts, exact = dd.partitions, dd.method == "exact"
    summary = DedupSummary(f"dedup {dd.method}", job)
    read = _read_options(dd)
    bands, rows = (0, 0) if exact else dd.band_shape()
    dtype = "<u4" if dd.scheme == "affine32" else "<u8"
    P = partitioned
    with P.work_dir(dd.work_dir, dd.output) as work:
        line_file = open(os.path.join(work, "lines.bin"), "wb")
        places = P.PlaceStore(work)
        buckets = P.Appender(work, "keys" if exact else "buckets", parts, P.EXACT if exact else P.BUCKET)
        with open(os.path.join(work, "signatures.bin"), "wb", buffering=1 << 20) as sig_file:
            n = 0
            for (blob, lengths, keys), rec, sigs in map_chunks(_PartitionSignWork(dd, job.input), job, read, summary):
                if keys is not None:  # --verify finds its documents by (input, line)
                    line_file.write(keys.astype("<i8").tobytes())
                places.add(blob, lengths)
                rec = np.array(rec)  # writable (a Ray result is a read-only view of the object store)
                rec["pos"] += n
                buckets.add(rec, (rec["k1"] if exact else rec["key"]) % np.uint64(parts))
                if sigs is not None:
                    sig_file.write(np.ascontiguousarray(sigs, dtype=dtype).tobytes())
                n += len(lengths)
        places.close()
        buckets.close()
        line_file.close()
        summary.close()

        def shingle_pass() -> None:
            """Fill the shingle store: one more pass over the input, wanted records only."""
            quiet = dataclasses.replace(job, progress=False)
            with open(os.path.join(work, "shingles.bin"), "wb") as data, \
                    open(os.path.join(work, "shingles.off"), "wb") as offsets:
                offsets.write(np.zeros(1, "<i8").tobytes())
                expect, end = 0, 0
                for ranks, sets in map_chunks(_WantedShingles(dd, job.input, work), quiet, read, Summary("verify")):
                    if len(ranks) and ranks[0] != expect:
                        raise CorpusError(f"an input changed between the passes of dedup --verify")
                    expect += len(ranks)
                    for hashes in sets:
                        data.write(hashes.astype("<u8").tobytes())
                        end += len(hashes)
                        offsets.write(np.array([end], "<i8").tobytes())

        if exact:
            summary.facts.update(P.exact_duplicates(work, n, parts, job.workers, job.ray))
        else:
            summary.facts.update(bands=bands, rows=rows)
            summary.facts.update(P.minhash_duplicates(work, n, parts, dd.num_perm, dtype, rows,
                                                      job.workers, job.ray,
                                                      shingle_pass if dd.verify else None, dd.threshold))
        final = DedupSummary(f"dedup {dd.method} (write)", job)
        reason = "exact_duplicate" if exact else "near_duplicate"
        paths = (dd.output, dd.report) + ((dd.removed,) if dd.removed else ())
        with atomic_paths(*paths) as tmps, places.reader() as place_of:
            files = [open(t, "wb") for t in tmps]
            try:
                dups = _duplicates(work, parts)
                nxt = next(dups, None)
                pos = 0
                for results in map_chunks(_LineWork(dd.id_key), job, read, final):
                    for file, line, ident, data in results:
                        if nxt is None or nxt[0] != pos:
                            files[0].write(data)
                            final.kept += 1
                        else:
                            _, root, size, est, jac = nxt
                            first = place_of(root)
                            entry = {**_place(file, line, ident), "duplicate_of": first}
                            entry.update({"method": "exact"} if exact else
                                         {"cluster": root, "cluster_size": size, "method": "minhash",
                                          "estimated_jaccard": round(est, 4)})
                            if dd.verify and not exact:
                                entry["jaccard"] = round(jac, 4)
                            files[1].write(dump_line(entry))
                            final.removed[reason] += 1
                            if dd.removed:
                                record = json.loads(data)
                                detail = f"duplicate of {first['file']}:{first['line']}"
                                record["_rejected"] = (
                                    {"reason": reason, "source": f"{file}:{line}", "detail": detail} if exact
                                    else {"reason": reason, "detail": detail, "source": f"{file}:{line}"})
                                files[2].write(dump_line(record))
                            nxt = next(dups, None)
                        pos += 1
            finally:
                for f in files:
                    f.close()
        final.close()
    summary.kept, summary.removed = final.kept, final.removed
    summary.facts["partitions"] = parts
    return summary


def run(cfg: DedupToolConfig) -> Summary:
    """Run the configured method and finish its summary (report on stderr, --summary JSON)."""
    if cfg.dedup.partitions is not None:
        with _one_ray_runtime(cfg.job):
            summary = run_partitioned(cfg)
    elif cfg.dedup.method == "exact":
        summary = run_exact(cfg)
    else:
        with _one_ray_runtime(cfg.job):
            summary = run_minhash(cfg)
    summary.finish(cfg.job)
    return summary
