"""The Qwen tokenizer: tiktoken BPE with Qwen's pre-tokenizer regex and 208 special tokens.

Exact Qwen behaviour (report section 2.2): the text is NFC-normalised, split by the regex below
(digits one by one), and each piece is BPE-encoded with the ranks of ``qwen.tiktoken``. Special
tokens follow the last rank (151,643 for Qwen) in a fixed order. Unlike Qwen's own tokenizer,
special-token strings in text are plain text unless the caller passes ``allow_special=True``, so
data can never inject ``<|im_end|>``.

tiktoken's regex engine recurses on long whitespace runs and overflows the stack on megabyte
inputs, so long texts are cut only where the regex itself always splits (argued at
``_SAFE_CUT``), which keeps the ids identical to an uncut encode; a stretch with no such position
is pre-tokenised by the ``regex`` module and its pieces are BPE-encoded one by one.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib.util
import os
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import regex
import tiktoken

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
VOCAB_FILE_NAME = "qwen.tiktoken"

# Texts up to this many characters go to tiktoken whole; longer ones are cut (see module doc).
# Whitespace runs of 100k characters still encode; the overflow starts between 100k and 1M.
MAX_CHUNK_CHARS = 32_768

# A position p is a cut point when the regex can never match across it and the pieces before it
# do not depend on what follows:
#   * after a number: \p{N} is matched one character at a time and by no other alternative;
#   * after a letter, before a non-letter: letters are only consumed by \p{L}+ runs (and the
#     contractions, which end in letters), so the run ends at p;
#   * after \r or \n, before a letter, number, punctuation or symbol: every alternative that
#     consumes a newline stops at the first non-whitespace character.
_SAFE_CUT = (
    r"(?<=\p{N})|(?<=\p{L})(?=[\p{N}\p{P}\p{S}\p{Z}\p{Cc}])|(?<=[\r\n])(?=[\p{L}\p{N}\p{P}\p{S}])"
)
_LAST_CUT = regex.compile(r"(?r)" + _SAFE_CUT)  # searches backwards
_NEXT_CUT = regex.compile(_SAFE_CUT)
_PRETOKENIZE = regex.compile(PAT_STR)


def _segments(text: str) -> Iterator[Tuple[bool, str]]:
    """``text`` cut at safe positions into (whole, piece) of at most MAX_CHUNK_CHARS characters;
    ``whole`` is False for a stretch with no safe position inside (encode it piece by piece)."""
    start, n = 0, len(text)
    while n - start > MAX_CHUNK_CHARS:
        limit = start + MAX_CHUNK_CHARS
        m = _LAST_CUT.search(text, start + 1, limit)
        if m is not None:
            yield True, text[start : m.start()]
            start = m.start()
            continue
        m = _NEXT_CUT.search(text, limit)  # the end of the stretch
        end = m.start() if m is not None else n
        yield False, text[start:end]
        start = end
    if start < n:
        yield True, text[start:]


class TokenizerError(ValueError):
    """A vocabulary file that cannot be used; the message names the file and line."""


def read_tiktoken_ranks(path: Union[str, os.PathLike]) -> Dict[bytes, int]:
    """Read a ``.tiktoken`` file ("base64token rank" per line) with one-line errors."""
    path = Path(path)
    try:
        lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read vocabulary file ({exc.strerror})") from None
    if not lines:
        raise TokenizerError(f"{path}: vocabulary file is empty")
    try:  # fast path; any doubt and the careful pass below names the line
        ranks = {base64.b64decode(t, validate=True): int(r) for t, r in (ln.split() for ln in lines)}
        if len(ranks) == len(lines) and len(set(ranks.values())) == len(lines) and min(ranks.values()) >= 0:
            return ranks
    except (ValueError, binascii.Error):
        pass
    ranks, seen_ranks = {}, set()
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{lineno}: expected 'base64token rank', got {line[:60]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{path}:{lineno}: bad token or rank {line[:60]!r}") from None
        if token in ranks:
            raise TokenizerError(f"{path}:{lineno}: token {token!r} appears twice")
        if rank in seen_ranks or rank < 0:
            raise TokenizerError(f"{path}:{lineno}: rank {rank} is negative or appears twice")
        ranks[token] = rank
        seen_ranks.add(rank)
    return ranks


def write_tiktoken_ranks(ranks: Dict[bytes, int], path: Union[str, os.PathLike]) -> None:
    """Write ranks in tiktoken's format, atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    os.replace(tmp, path)


def default_vocab_file() -> Path:
    """The ``qwen.tiktoken`` shipped inside the installed ``dashscope`` wheel."""
    spec = importlib.util.find_spec("dashscope")  # found, not imported: importing it is slow
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "no vocabulary given and the dashscope package (which ships qwen.tiktoken) is not "
            "installed; pass a .tiktoken file or an HF model directory"
        )
    return Path(spec.submodule_search_locations[0]) / "resources" / VOCAB_FILE_NAME


def resolve_vocab_file(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The vocabulary file: an explicit .tiktoken file, an HF model dir, else dashscope's."""
    if path is None:
        found = default_vocab_file()
    else:
        found = Path(path)
        if found.is_dir():
            found = found / VOCAB_FILE_NAME
            if not found.is_file():
                raise TokenizerError(f"{path}: model directory has no {VOCAB_FILE_NAME}")
    if not found.is_file():
        raise TokenizerError(f"{found}: no such vocabulary file")
    return found.resolve()


class QwenTokenizer:
    """Qwen's tokenizer; also usable directly as megatron-core's dataset tokenizer.

    megatron-core's ``GPTDataset`` reads ``eod``, ``vocab_size`` and ``unique_identifiers``; its
    inference code reads ``eod``, ``pad``, ``tokenize`` and ``detokenize``. Qwen has no BOS and
    pads with ``<|endoftext|>``.
    """

    def __init__(self, vocab_file: Union[str, os.PathLike], name: str = "qwen"):
        self.vocab_file = Path(vocab_file)
        ranks = read_tiktoken_ranks(self.vocab_file)
        self.vocab_sha256 = hashlib.sha256(self.vocab_file.read_bytes()).hexdigest()
        first_special = max(ranks.values()) + 1
        self.special_tokens: Dict[str, int] = {
            tok: first_special + i for i, tok in enumerate(SPECIAL_TOKENS)
        }
        self._encoding = tiktoken.Encoding(
            name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.num_ranks = len(ranks)
        self.vocab_size = first_special + len(SPECIAL_TOKENS)
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self._special_split = regex.compile("(" + "|".join(map(regex.escape, SPECIAL_TOKENS)) + ")")

    # megatron-core's tokenizer interface -------------------------------------------------
    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def pad(self) -> int:
        return self.eod_id

    eos = eod
    bos = None

    @property
    def unique_identifiers(self) -> Dict[str, str]:
        """What megatron-core's dataset description (and so its index-cache hash) records."""
        return {"class": type(self).__name__, "vocab_sha256": self.vocab_sha256}

    def tokenize(self, text: str) -> List[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    # encoding --------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> List[int]:
        """Token ids of ``text``; special-token strings are plain text unless allowed."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if not text.isascii():  # ASCII is already NFC, and isascii() is O(1)
            text = unicodedata.normalize("NFC", text)
        if not allow_special:
            return self._encode_ordinary(text)
        ids: List[int] = []
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_ordinary(part))
        return ids

    def encode_batch(
        self, texts: Iterable[str], allow_special: bool = False, num_threads: Optional[int] = None
    ) -> List[List[int]]:
        """Encode many texts, in contiguous shards on a thread pool (tiktoken releases the GIL).

        ``num_threads``: default min(8, usable CPUs); 1 is a plain loop. Shards, not tiktoken's
        ``encode_ordinary_batch``, which makes one future per text."""
        texts = list(texts)
        threads = num_threads or _batch_threads()
        if threads < 2 or len(texts) < 4 * threads:
            return [self.encode(t, allow_special) for t in texts]
        step = -(-len(texts) // threads)
        shards = [texts[i : i + step] for i in range(0, len(texts), step)]
        encode = functools.partial(self.encode, allow_special=allow_special)
        done = _thread_pool(threads).map(lambda shard: [encode(t) for t in shard], shards)
        return [ids for shard in done for ids in shard]

    def encode_array(self, text: str) -> np.ndarray:
        """``encode(text)`` as an int32 array, built by tiktoken without a list of Python ints.

        The bulk path (``preprocess_data.py``): no list to build and convert, which is ~15% of the
        encoding cost. Special-token strings are plain text, as in ``encode``."""
        if not isinstance(text, str):
            raise TypeError(f"encode_array() takes a str, got {type(text).__name__}")
        if not text.isascii():  # ASCII is already NFC, and isascii() is O(1)
            text = unicodedata.normalize("NFC", text)
        if len(text) <= MAX_CHUNK_CHARS:
            return self._whole_to_array(text)
        parts = [self._whole_to_array(seg) if whole else np.asarray(self._encode_pieces(seg), np.int32)
                 for whole, seg in _segments(text)]
        return np.concatenate(parts) if parts else np.empty(0, np.int32)

    def _whole_to_array(self, text: str) -> np.ndarray:
        try:
            return self._encoding.encode_to_numpy(text, disallowed_special=()).view(np.int32)
        except UnicodeEncodeError:  # lone surrogates become U+FFFD, as tiktoken's encode does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._encoding.encode_to_numpy(text, disallowed_special=()).view(np.int32)

    def _encode_ordinary(self, text: str) -> List[int]:
        if len(text) <= MAX_CHUNK_CHARS:
            return self._encoding.encode_ordinary(text)
        ids: List[int] = []
        for whole, seg in _segments(text):
            ids.extend(self._encoding.encode_ordinary(seg) if whole else self._encode_pieces(seg))
        return ids

    def _encode_pieces(self, seg: str) -> List[int]:
        """A stretch with no safe cut: pre-tokenised here, so it never reaches tiktoken's regex."""
        seg = seg.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # as tiktoken does
        ids: List[int] = []
        for piece in _PRETOKENIZE.findall(seg):
            ids.extend(self._encoding._encode_single_piece(piece.encode("utf-8")))
        return ids

    # decoding --------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special: bool = False, errors: str = "replace") -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < self.eod_id]
        return self._encoding.decode(ids, errors=errors)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._encoding.decode_bytes([int(i) for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        return self._encoding.decode_single_token_bytes(int(token_id))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"QwenTokenizer({str(self.vocab_file)!r}, vocab_size={self.vocab_size})"


def _batch_threads() -> int:
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _thread_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="qwen-tokenizer")


@functools.lru_cache(maxsize=8)
def _cached(vocab_file: Path) -> QwenTokenizer:
    return QwenTokenizer(vocab_file)


def load_tokenizer(path: Optional[Union[str, os.PathLike]] = None) -> QwenTokenizer:
    """The Qwen tokenizer from a .tiktoken file, an HF model dir, or dashscope's copy (cached)."""
    return _cached(resolve_vocab_file(path))
