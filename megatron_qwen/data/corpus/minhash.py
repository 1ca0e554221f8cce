"""MinHash signatures and LSH banding, vectorised with numpy.

A document becomes a set of shingles (word or character n-grams), each shingle a 64-bit hash,
and the set becomes ``num_perm`` minima of random hash functions: the fraction of equal minima of
two documents estimates their Jaccard similarity. Everything per shingle is one numpy operation
over a ``[num_perm x n_shingles]`` block spanning many documents, never a Python loop over
permutations, shingles or words: words and n-grams are hashed from the codepoint array.

Three permutation schemes (``scheme=``):

* ``mersenne``: ``(a*h + b) mod (2^61 - 1)``, the textbook universal family, computed exactly in
  uint64 by splitting the 122-bit product into 32-bit halves (see ``_mulmod_mersenne61``).
* ``affine64``: ``a*h + b mod 2^64`` with odd ``a``, which wraps natively in uint64 (~3x fewer
  operations than ``mersenne``).
* ``affine32`` (default): the same on the top 32 bits of the shingle hash, in uint32. SIMD units
  multiply 32-bit lanes natively, so it is another ~2-3x faster, and signatures take half the memory.

Why the affine maps are sound: with odd ``a`` the map is a bijection of the w-bit values, so it
adds no collisions (unlike folding a 61-bit result into 32 bits); it is Dietzfelbinger's
multiply-add-shift family, (near-)universal in its high bits, and ``min`` is decided by the high
bits; and its inputs are already avalanche-mixed (``fmix64``). datasketch 2.x uses the same family
(its default is affine32). The tests check all three against the true Jaccard and datasketch.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import unicodedata
from typing import Callable, Optional, Sequence

import numpy as np
import regex

MERSENNE_61 = np.uint64((1 << 61) - 1)
SHINGLE_KINDS = ("words", "chars", "auto")
SCHEMES = ("affine32", "affine64", "mersenne")

_WORD = regex.compile(r"\w+")
# Han, kana, hangul: scripts written without spaces between words.
_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the n-gram polynomial hash
_CHAR_SALT = np.uint64(0xC2B2AE3D27D4EB4F)  # keeps char shingles apart from word shingles

# Numpy warns on uint64 overflow only for scalars; all arithmetic below is on arrays and wraps.


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: a bijection that spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


# --------------------------------------------------------------------------- shingles


@dataclasses.dataclass(frozen=True)
class ShingleSpec:
    """How a document becomes a set of shingles."""

    kind: str = "auto"  # words | chars | auto (chars when >= cjk_ratio of the letters are CJK)
    ngram: int = 5  # words per shingle
    char_ngram: int = 5  # characters per shingle
    cjk_ratio: float = 0.3

    def __post_init__(self):
        if self.kind not in SHINGLE_KINDS:
            raise ValueError(f"shingle={self.kind!r}: choose one of {', '.join(SHINGLE_KINDS)}")
        if self.ngram < 1 or self.char_ngram < 1:
            raise ValueError(f"ngram={self.ngram}, char_ngram={self.char_ngram}: must be >= 1")


_TABLE_SIZE = 0x40000  # planes 0-3 hold every script; codepoints above count as non-word


@functools.lru_cache(maxsize=None)
def _char_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-codepoint flags, built once (~0.2 s): word character (regex ``\\w``), CJK, whitespace."""
    every = "".join(map(chr, range(_TABLE_SIZE)))
    tables = []
    for pattern in (regex.compile(r"\w+"), regex.compile(_CJK.pattern + "+"), regex.compile(r"\s+")):
        flags = np.zeros(_TABLE_SIZE + 1, dtype=bool)  # the last entry: any higher codepoint
        for m in pattern.finditer(every):
            flags[m.start() : m.end()] = True
        tables.append(flags)
    return tables[0], tables[1], tables[2]


@functools.lru_cache(maxsize=None)
def _nfkc_singles() -> np.ndarray:
    """codepoint -> its NFKC form where that is one codepoint (identity elsewhere), built once."""
    table = np.arange(_TABLE_SIZE, dtype=np.uint32)
    for c in range(_TABLE_SIZE):
        if not 0xD800 <= c < 0xE000:
            n = unicodedata.normalize("NFKC", chr(c))
            if len(n) == 1 and n != chr(c):
                table[c] = ord(n)
    return table


def build_tables() -> None:
    """Build the shingler's per-codepoint tables now (~0.14 s CPU): called by a driver before it
    forks its workers, they are built once and shared, not once in every worker of every pass."""
    _char_tables()
    _nfkc_singles()


def _fold(text: str) -> str:
    """NFKC and case folding: what shingles are made of.

    CPython's NFKC is slow on CJK text that is not already normalised (Chinese with full-width
    punctuation: ~0.3 ms a page) and fast on text that is. So for text that is mostly non-Latin,
    the one-codepoint compatibility mappings are applied first with a table lookup, and NFKC then
    finds little or nothing to do. The result is exactly NFKC: each mapped character c' = NFKC(c)
    has NFKD(c') = NFKD(c), so the text's NFKD, and hence its NFKC, is unchanged by the lookup.
    """
    if text.isascii():
        return text.lower()
    head = text[:256]
    if len(head.encode("utf-8", "surrogatepass")) < 1.5 * len(head):  # mostly Latin script
        return unicodedata.normalize("NFKC", text).casefold()
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    low = codes < _TABLE_SIZE
    mapped = np.where(low, _nfkc_singles()[np.where(low, codes, 0)], codes)
    text = unicodedata.normalize("NFKC", mapped.tobytes().decode("utf-32-le", "surrogatepass"))
    return text.casefold()


def _codepoints(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts' codepoints in one array, and each text's length."""
    joined = "".join(texts).encode("utf-32-le", "surrogatepass")
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    return np.frombuffer(joined, dtype=np.uint32), lengths


def _flags(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return table[np.minimum(codes, np.uint32(_TABLE_SIZE))]


def _ngrams(letters: np.ndarray, doc: np.ndarray, n_docs: int, n: int):
    """Hash every run of ``n`` consecutive letters of one document (a document with fewer than n
    letters: one shingle of all of them). Returns (hashes, doc of each), in document order."""
    count = max(letters.size - n + 1, 0)
    acc = letters[:count].copy()
    for k in range(1, n):  # polynomial hash in wrapping uint64, then avalanche
        acc = acc * _POLY + letters[k : k + count]
    inside = doc[:count] == doc[n - 1 : n - 1 + count]
    hashes, owner = fmix64(acc[inside]), doc[:count][inside]
    sizes = np.bincount(doc, minlength=n_docs)
    short = np.flatnonzero((sizes > 0) & (sizes < n))
    if short.size:  # rare: a document shorter than one shingle
        starts = np.concatenate(([0], np.cumsum(sizes)))
        extra = []
        for d in short:
            acc1 = 0
            for h in letters[starts[d] : starts[d + 1]].tolist():
                acc1 = (acc1 * int(_POLY) + h) & 0xFFFFFFFFFFFFFFFF
            extra.append(acc1)
        hashes = np.concatenate([hashes, fmix64(np.array(extra, dtype=np.uint64))])
        owner = np.concatenate([owner, short])
        order = np.argsort(owner, kind="stable")
        hashes, owner = hashes[order], owner[order]
    return hashes, owner


def _word_letters(codes: np.ndarray, doc: np.ndarray):
    """One 64-bit hash per word (maximal run of word characters inside one document).

    A word hashes to fmix64 of the wrapping sum of fmix64(char, position): distinct words differ
    in some (char, position) term, so they collide only by chance (~2^-64).
    """
    is_word = _flags(_char_tables()[0], codes)
    starts = is_word.copy()
    starts[1:] &= ~is_word[:-1] | (doc[1:] != doc[:-1])
    keep = np.flatnonzero(is_word)
    chars = codes[keep].astype(np.uint64)
    first = np.flatnonzero(starts[keep])
    if first.size == 0:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    pos = np.arange(chars.size) - np.repeat(first, np.diff(np.append(first, chars.size)))
    terms = fmix64(chars * _POLY + pos.astype(np.uint64) * _CHAR_SALT + _POLY)
    return fmix64(np.add.reduceat(terms, first)), doc[keep[first]]


def shingle_batch(texts: Sequence[str], spec: ShingleSpec) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of many texts at once: (uint64 hashes in document order, count per text).

    Text is NFKC-normalised and case-folded; words are runs of word characters (regex ``\\w``);
    character shingles see whitespace runs as one space. Hashes may repeat within a document.
    """
    if not len(texts):
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    codes, lengths = _codepoints([_fold(t) for t in texts])
    doc = np.repeat(np.arange(len(texts)), lengths)
    chars = np.full(len(texts), spec.kind == "chars")
    if spec.kind == "auto":
        word, cjk, _ = _char_tables()
        letters = np.bincount(doc, weights=_flags(word, codes), minlength=len(texts))
        cjks = np.bincount(doc, weights=_flags(cjk, codes), minlength=len(texts))
        chars = (letters > 0) & (cjks >= spec.cjk_ratio * letters)
    parts = []
    if not chars.all():  # word shingles
        sel = slice(None) if not chars.any() else ~chars[doc]
        letters, owner = _word_letters(codes[sel], doc[sel])
        parts.append(_ngrams(letters, owner, len(texts), spec.ngram))
    if chars.any():  # character shingles; a whitespace run is one space, none at the ends
        sel = chars[doc]
        c, d = codes[sel], doc[sel]
        space = _flags(_char_tables()[2], c)
        solid = (~space).astype(np.int64)
        before = np.cumsum(solid) - solid  # solid characters before i, from the corpus start
        doc_start = np.concatenate(([0], np.cumsum(np.bincount(d, minlength=len(texts)))[:-1]))
        before -= before[doc_start[d]]  # ... from its document's start
        after = np.bincount(d, weights=solid, minlength=len(texts))[d] - before - solid
        repeat = np.zeros(len(d), dtype=bool)
        repeat[1:] = space[1:] & space[:-1] & (d[1:] == d[:-1])
        keep = ~space | ((before > 0) & (after > 0) & ~repeat)
        c, d, space = c[keep], d[keep], space[keep]
        letters = fmix64(np.where(space, np.uint32(32), c).astype(np.uint64) ^ _CHAR_SALT)
        parts.append(_ngrams(letters, d, len(texts), spec.char_ngram))
    hashes = np.concatenate([h for h, _ in parts])
    owner = np.concatenate([o for _, o in parts])
    if len(parts) == 2:
        order = np.argsort(owner, kind="stable")
        hashes, owner = hashes[order], owner[order]
    return hashes, np.bincount(owner, minlength=len(texts))


def shingle_hashes(text: str, spec: ShingleSpec) -> np.ndarray:
    """The shingle hashes of one text (see ``shingle_batch``)."""
    return shingle_batch([text], spec)[0]


def is_cjk(text: str, ratio: float = 0.3) -> bool:
    """True when CJK characters make up at least ``ratio`` of the word characters."""
    word, cjk, _ = _char_tables()
    codes, _ = _codepoints([text])
    letters = int(np.count_nonzero(_flags(word, codes)))
    return letters > 0 and np.count_nonzero(_flags(cjk, codes)) >= ratio * letters


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """True Jaccard similarity of two shingle-hash sets (arrays may hold repeats)."""
    a, b = np.unique(a), np.unique(b)
    if a.size == 0 and b.size == 0:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


# --------------------------------------------------------------------------- signatures


def _mulmod_mersenne61(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``a * x mod (2^61 - 1)`` for a, x < 2^61, exact in uint64 (broadcasting).

    Split a = a1*2^32 + a0 and x = x1*2^32 + x0; with 2^61 = 1 (mod p), 2^64 = 8, and the middle
    term m*2^32 = (m >> 29) + (m & (2^29-1))*2^32. Every partial sum stays below 2^64.
    """
    lo32 = np.uint64(0xFFFFFFFF)
    a1, a0 = a >> np.uint64(32), a & lo32
    x1, x0 = x >> np.uint64(32), x & lo32
    high = (a1 * x1) << np.uint64(3)  # < 2^61
    mid = a1 * x0 + a0 * x1  # < 2^62
    mid = (mid >> np.uint64(29)) + ((mid & np.uint64((1 << 29) - 1)) << np.uint64(32))  # < 2^62
    low = a0 * x0  # < 2^64
    low = (low & MERSENNE_61) + (low >> np.uint64(61))  # < 2^61 + 8
    s = high + mid + low  # < 2^63
    s = (s & MERSENNE_61) + (s >> np.uint64(61))
    return np.where(s >= MERSENNE_61, s - MERSENNE_61, s)


class MinHasher:
    """Batched MinHash: ``signatures(list of shingle-hash arrays) -> [n_docs, num_perm]`` uint64.

    The permutations depend only on (num_perm, seed, scheme), so signatures computed in different
    processes or runs are comparable.
    """

    def __init__(self, num_perm: int = 128, seed: int = 1, scheme: str = "affine32",
                 block: Optional[int] = None):
        if num_perm < 1:
            raise ValueError(f"num_perm={num_perm}: must be >= 1")
        if scheme not in SCHEMES:
            raise ValueError(f"scheme={scheme!r}: choose one of {', '.join(SCHEMES)}")
        self.num_perm, self.seed, self.scheme = num_perm, seed, scheme
        rng = np.random.Generator(np.random.PCG64(seed))
        self.dtype = np.uint32 if scheme == "affine32" else np.uint64
        self.empty = np.iinfo(self.dtype).max  # the signature of a document with no shingles
        # shingles per [num_perm x block] working array: ~4 MB, so it stays in cache
        itemsize = np.dtype(self.dtype).itemsize
        self.block = max(block or (4 << 20) // (num_perm * itemsize), 1)
        if scheme == "mersenne":
            self.a = rng.integers(1, int(MERSENNE_61), num_perm, dtype=np.uint64)[:, None]
            self.b = rng.integers(0, int(MERSENNE_61), num_perm, dtype=np.uint64)[:, None]
        else:
            bits = np.iinfo(self.dtype).bits
            self.a = (rng.integers(0, 1 << (bits - 1), num_perm, dtype=np.uint64) * 2 + 1).astype(self.dtype)[:, None]
            self.b = rng.integers(0, 1 << bits, num_perm, dtype=np.uint64).astype(self.dtype)[:, None]

    def _permute(self, h: np.ndarray) -> np.ndarray:
        """[num_perm x len(h)] permuted hash values of the shingle hashes ``h``."""
        if self.scheme == "mersenne":
            x = (h & MERSENNE_61) + (h >> np.uint64(61))
            x = np.where(x >= MERSENNE_61, x - MERSENNE_61, x)
            v = _mulmod_mersenne61(self.a, x[None, :]) + self.b
            return np.where(v >= MERSENNE_61, v - MERSENNE_61, v)
        if self.scheme == "affine32":
            h = (h >> np.uint64(32)).astype(np.uint32)
        v = np.multiply.outer(self.a[:, 0], h)
        v += self.b
        return v

    def signatures(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Signatures of documents whose shingle hashes lie back to back in ``hashes``
        (``counts[i]`` of them for document i). One row per document; a document with no
        shingles gets a row of ``self.empty``."""
        counts = np.asarray(counts, dtype=np.int64)
        out = np.full((len(counts), self.num_perm), self.empty, dtype=self.dtype)
        ends = np.cumsum(counts)
        ends_list = ends.tolist()
        start = 0
        while start < len(counts):
            base = ends_list[start] - int(counts[start])
            # Whole documents per block; a document larger than a block goes alone, in slices.
            stop = max(bisect.bisect_right(ends_list, base + self.block), start + 1)
            docs = start + np.flatnonzero(counts[start:stop])
            if len(docs) == 1 and counts[docs[0]] > self.block:
                row = out[docs[0]]
                for lo in range(base, ends[docs[0]], self.block):
                    block = self._permute(hashes[lo : min(lo + self.block, ends[docs[0]])])
                    np.minimum(row, block.min(axis=1), out=row)
            elif len(docs):
                offsets = ends[docs] - counts[docs] - base
                block = self._permute(hashes[base : ends[stop - 1]])
                out[docs] = np.minimum.reduceat(block, offsets, axis=1).T
            start = stop
        return out

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """The signature of one document."""
        return self.signatures(hashes, [hashes.size])[0]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal minima; works row-wise on [n, num_perm] arrays."""
    return np.mean(sig_a == sig_b, axis=-1)


# --------------------------------------------------------------------------- LSH parameters


def _gauss_legendre(lo: float, hi: float, n: int):
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (hi - lo) * x + 0.5 * (hi + lo), 0.5 * (hi - lo) * w


def optimal_bands_rows(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
                       false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive and false-negative areas.

    The criterion of datasketch's ``MinHashLSH``: a pair of similarity s collides in some band
    with probability P(s) = 1 - (1 - s^r)^b; the error is w_fp * integral_0^t P + w_fn *
    integral_t^1 (1 - P), over all b*r <= num_perm. P is a polynomial of degree b*r <= num_perm,
    so Gauss-Legendre with ceil((num_perm+1)/2) nodes integrates it exactly, for every (b, r) at
    once. Ties go to the smallest b, then the smallest r (datasketch's loop order).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold}: must be between 0 and 1 (exclusive)")
    if false_positive_weight + false_negative_weight <= 0:
        raise ValueError("false positive and false negative weights must not both be 0")
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)],
                     dtype=np.float64)
    b, r = pairs[:, :1], pairs[:, 1:]
    nodes = num_perm // 2 + 1
    s_lo, w_lo = _gauss_legendre(0.0, threshold, nodes)
    s_hi, w_hi = _gauss_legendre(threshold, 1.0, nodes)
    fp = (1.0 - (1.0 - s_lo[None, :] ** r) ** b) @ w_lo
    fn = ((1.0 - s_hi[None, :] ** r) ** b) @ w_hi
    error = fp * false_positive_weight + fn * false_negative_weight
    # Float noise between exact ties must not reorder them: keep the first within 1e-12.
    best = int(np.flatnonzero(error <= error.min() + 1e-12)[0])
    return int(pairs[best, 0]), int(pairs[best, 1])


# --------------------------------------------------------------------------- LSH banding


def band_keys(signatures: np.ndarray, band: int, rows: int) -> np.ndarray:
    """One 64-bit key per document for band ``band`` (its ``rows`` minima hashed together)."""
    cols = signatures[:, band * rows : (band + 1) * rows]
    key = np.full(len(signatures), np.uint64(band) + np.uint64(1), dtype=np.uint64)
    for j in range(rows):
        key = key * _POLY + cols[:, j].astype(np.uint64)
    return fmix64(key)


def band_edges(signatures: np.ndarray, band: int, rows: int, active: np.ndarray | None = None):
    """Candidate pairs of one band as (first, member) arrays: every document whose band equals
    that of an earlier document is paired with the first (lowest index) such document.

    Sorting the keys (stable, so index order inside a bucket) replaces a dict of buckets;
    pairs whose keys collide without equal minima are dropped.
    """
    idx = np.arange(len(signatures)) if active is None else np.flatnonzero(active)
    keys = band_keys(signatures[idx], band, rows)
    order = np.argsort(keys, kind="stable")
    keys, idx = keys[order], idx[order]
    new_bucket = np.empty(len(keys), dtype=bool)
    new_bucket[:1] = True
    new_bucket[1:] = keys[1:] != keys[:-1]
    first = idx[np.flatnonzero(new_bucket)][np.cumsum(new_bucket) - 1]
    member = ~new_bucket
    src, dst = first[member], idx[member]
    cols = slice(band * rows, (band + 1) * rows)
    same = np.all(signatures[src, cols] == signatures[dst, cols], axis=1)
    return src[same], dst[same]


def components(n: int, src: np.ndarray, dst: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Union-find over the edges (src, dst): each document's root, the lowest index of its cluster.

    ``labels`` (a previous result) lets bands be processed in passes: its document->root edges
    carry the earlier unions into this one.
    """
    # imported here: scipy.sparse is ~0.3 s of CPU at every start, and only the in-memory path needs it
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if labels is not None:
        src = np.concatenate([src, np.arange(n)])
        dst = np.concatenate([dst, labels])
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    root = np.full(comp.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(root, comp, np.arange(n))
    return root[comp]


@dataclasses.dataclass
class LSHResult:
    """The outcome of banding: per-document cluster root and the pairs that linked them."""

    root: np.ndarray  # root[i] == i: kept; otherwise i is a duplicate of document root[i]
    candidate_pairs: int  # pairs produced by the bands (before verification)
    verified_pairs: int  # pairs that passed verification (== candidate_pairs without it)


def lsh_clusters(signatures: np.ndarray, bands: int, rows: int, bands_per_pass: int | None = None,
                 verify: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> LSHResult:
    """Cluster documents whose signatures agree on all rows of at least one band.

    ``bands_per_pass`` bounds the candidate pairs held at once: each pass bands only those columns,
    then collapses its unions into per-document roots. ``verify(src, dst) -> bool mask`` keeps only
    pairs that pass (e.g. a true-Jaccard check); pairs already in one cluster are not re-verified.
    """
    n = len(signatures)
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands*rows={bands * rows} exceeds num_perm={signatures.shape[1]}")
    active = ~np.all(signatures == np.iinfo(signatures.dtype).max, axis=1)
    root = np.arange(n, dtype=np.int64)
    per_pass = bands_per_pass or bands
    candidates = verified = 0
    for start in range(0, bands, per_pass):
        srcs, dsts = [], []
        for band in range(start, min(start + per_pass, bands)):
            src, dst = band_edges(signatures, band, rows, active)
            candidates += len(src)
            if verify is not None:
                keep = root[src] != root[dst]  # already linked through an earlier pass
                src, dst = src[keep], dst[keep]
            srcs.append(src)
            dsts.append(dst)
        src = np.concatenate(srcs) if srcs else np.empty(0, np.int64)
        dst = np.concatenate(dsts) if dsts else np.empty(0, np.int64)
        if verify is not None and len(src):
            pairs = np.unique(np.stack([src, dst], axis=1), axis=0)
            ok = np.asarray(verify(pairs[:, 0], pairs[:, 1]), dtype=bool)
            src, dst = pairs[ok, 0], pairs[ok, 1]
            verified += int(ok.sum())
        root = components(n, src, dst, root)
    if verify is None:
        verified = candidates
    return LSHResult(root=root, candidate_pairs=candidates, verified_pairs=verified)


def signatures_of_texts(texts: Sequence[str], spec: ShingleSpec, hasher: MinHasher) -> np.ndarray:
    """Shingle and sign a batch of texts."""
    return hasher.signatures(*shingle_batch(texts, spec))
