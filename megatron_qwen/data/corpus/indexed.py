"""JSONL to a megatron-core indexed dataset (``{prefix}_{key}_document.bin/.idx``).

Workers tokenize (the tokenizer is loaded once per process from its path, so the job pickles
small) into one token array per chunk; the driver appends each chunk, in input order, with
megatron-core's own ``IndexedDatasetBuilder`` (one write per chunk instead of one per document,
the same index), so ``IndexedDataset`` reads the files back exactly as Megatron-LM's
``preprocess_data.py`` would have written them. Local worker processes write their token arrays
to shard files beside the output and send back only the lengths; the driver splices the shards
in with an in-kernel copy, so on a small machine it does not take CPU from the workers (Ray
tasks may run on other machines: their arrays travel through the object store).

One document is one sequence; with ``append_eod`` it ends with ``<|endoftext|>``. Token ids take
megatron-core's ``DType.optimal_dtype(vocab_size)``: uint16 below 65,500 ids, else int32 (the
Qwen vocabulary). Each key's documents are written in the same
order, so they align across keys; a record missing any key is skipped (and counted) for all keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import warnings
from typing import Optional

import numpy as np

from megatron_qwen.config import ConfigError
from megatron_qwen.tokenizer import load_tokenizer
from megatron_qwen.data.corpus.jsonl import CorpusError, ReadOptions
from megatron_qwen.data.corpus.runner import JobConfig, Summary, atomic_paths, map_chunks


@dataclasses.dataclass
class PreprocessConfig:
    """Megatron-LM's preprocess_data.py flags that apply to Qwen."""

    output_prefix: str = ""  # writes {prefix}_{key}_document.bin and .idx
    json_keys: list = dataclasses.field(default_factory=lambda: ["text"])  # one dataset per key
    append_eod: bool = False  # end every document with <|endoftext|>
    tokenizer_path: Optional[str] = None  # .tiktoken file or HF dir; default: the Qwen vocabulary

    def validate(self) -> None:
        if isinstance(self.json_keys, str):
            self.json_keys = [self.json_keys]
        if not self.output_prefix:
            raise ConfigError("preprocess.output_prefix: give --output-prefix PREFIX")
        if not self.json_keys:
            raise ConfigError("preprocess.json_keys: give at least one key (--json-keys text)")
        if len(set(self.json_keys)) < len(self.json_keys):
            raise ConfigError(f"preprocess.json_keys={self.json_keys}: a key is repeated")


def output_paths(prefix: str, key: str) -> tuple:
    base = f"{prefix}_{key}_document"
    return f"{base}.bin", f"{base}.idx"


class Encoder:
    """Worker side: the documents of a chunk as, per key, (all token ids, per-document lengths)."""

    def __init__(self, json_keys: list, append_eod: bool, tokenizer_path: Optional[str],
                 shard_dir: Optional[str] = None):
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.tokenizer_path = tokenizer_path
        self.shard_dir = shard_dir  # set: write the ids there and return the file's path instead
        self._shards = itertools.count()
        self._tok = None  # loaded on first use in each process (finding the file costs stat calls)

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    def __call__(self, docs: list) -> dict:
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_path)
        tok = self._tok
        eod = np.array([tok.eod_id], dtype=np.int32)
        out = {}
        for key in self.json_keys:
            parts, lengths = [], []
            for doc in docs:
                ids = tok.encode_array(doc.record[key])
                parts.append(ids)
                if self.append_eod:
                    parts.append(eod)
                lengths.append(ids.size + self.append_eod)
            ids = np.concatenate(parts) if parts else np.empty(0, np.int32)
            if self.shard_dir is not None:
                path = os.path.join(self.shard_dir, f"{os.getpid()}-{next(self._shards)}-{key}.bin")
                ids.tofile(path)
                ids = path
            out[key] = (ids, np.asarray(lengths, dtype=np.int64))
        return out


_INDEX_BLOCK = 1 << 20  # sequences per block when the index is written


def _chunk_builder_class():
    """megatron-core's IndexedDatasetBuilder plus ``add_documents``: a chunk in one write, and an
    index that streams (megatron-core's keeps two Python lists, ~70 bytes a document in memory;
    this one writes each chunk's lengths to a side file, 4 bytes a document on disk, and writes
    the ``.idx`` from it block by block: the same bytes as ``IndexedDatasetBuilder.finalize``)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, _IndexWriter

    class ChunkBuilder(IndexedDatasetBuilder):
        def __init__(self, bin_path: str, dtype=np.int32):
            super().__init__(bin_path, dtype=dtype)
            self.lengths_path = f"{bin_path}.lengths"
            self.lengths_file = open(self.lengths_path, "wb")
            self.count = 0  # sequences (= documents) so far

        def add_documents(self, ids, lengths: np.ndarray) -> None:
            """Many one-sequence documents at once; the same index as ``add_document`` each.

            ``ids``: the tokens, or the path of a shard file holding them (moved in, then deleted).
            """
            if isinstance(ids, str):
                _splice(ids, self.data_file)
            else:
                self.data_file.write(memoryview(np.ascontiguousarray(ids, dtype=self.dtype)))
            self.lengths_file.write(np.asarray(lengths, dtype="<i4").tobytes())
            self.count += len(lengths)

        def close(self) -> None:
            self.data_file.close()
            self.lengths_file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lengths_path)

        def finalize(self, idx_path: str) -> None:
            """megatron-core's index layout: header, counts, int32 lengths, int64 byte pointers,
            int64 document indices (0..count: one sequence per document)."""
            self.data_file.close()
            self.lengths_file.close()
            n = self.count
            lengths = np.memmap(self.lengths_path, dtype="<i4", mode="r") if n else np.empty(0, "<i4")
            itemsize = DType.size(self.dtype)
            with _IndexWriter(idx_path, self.dtype) as writer:
                out = writer.idx_writer
                out.write(np.array([n, n + 1], dtype="<u8").tobytes())
                for lo in range(0, n, _INDEX_BLOCK):
                    out.write(np.asarray(lengths[lo : lo + _INDEX_BLOCK]).tobytes())
                pointer = 0
                for lo in range(0, n, _INDEX_BLOCK):
                    block = np.asarray(lengths[lo : lo + _INDEX_BLOCK], dtype=np.int64) * itemsize
                    ends = np.cumsum(block) + pointer
                    out.write((ends - block).astype("<i8").tobytes())
                    pointer = int(ends[-1])
                for lo in range(0, n + 1, _INDEX_BLOCK):
                    out.write(np.arange(lo, min(lo + _INDEX_BLOCK, n + 1), dtype="<i8").tobytes())
            del lengths
            os.unlink(self.lengths_path)

    return ChunkBuilder


def _splice(path: str, out) -> None:
    """Append the file at ``path`` to the open binary file ``out``, then delete it."""
    out.flush()
    with open(path, "rb") as src:
        left = os.fstat(src.fileno()).st_size
        try:
            while left > 0:  # in the kernel: no copy through this process
                n = os.copy_file_range(src.fileno(), out.fileno(), left)
                if n == 0:
                    raise OSError("copy_file_range copied nothing")
                left -= n
        except (AttributeError, OSError):  # not Linux, or a file system without it
            src.seek(os.fstat(src.fileno()).st_size - left)
            out.seek(0, os.SEEK_END)
            shutil.copyfileobj(src, out)
    out.seek(0, os.SEEK_END)
    os.unlink(path)


@contextlib.contextmanager
def _shard_dir(beside: str, job: JobConfig):
    """A scratch directory next to the output (same file system) for local workers, else None."""
    if job.workers < 2 or job.ray:
        yield None
        return
    path = f"{beside}.shards"
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def build_indexed_dataset(cfg: PreprocessConfig, job: JobConfig, summary: Summary) -> dict:
    """Run the job; returns {key: prefix of the written dataset}."""
    with warnings.catch_warnings():  # megatron-core warns about optional GPU libraries on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType
        builder_class = _chunk_builder_class()

    tok = load_tokenizer(cfg.tokenizer_path)
    dtype = DType.optimal_dtype(tok.vocab_size)
    read = ReadOptions(required_keys=tuple(cfg.json_keys), fast_json=True)  # records are not written back
    finals = [p for key in cfg.json_keys for p in output_paths(cfg.output_prefix, key)]
    with atomic_paths(*finals) as tmps, _shard_dir(tmps[0], job) as shards:
        encoder = Encoder(cfg.json_keys, cfg.append_eod, cfg.tokenizer_path, shards)
        builders = {key: builder_class(tmps[2 * i], dtype=dtype)
                    for i, key in enumerate(cfg.json_keys)}
        with contextlib.ExitStack() as stack:
            for b in builders.values():
                stack.callback(b.close)
            for result in map_chunks(encoder, job, read, summary):
                tokens = 0
                for key, (ids, lengths) in result.items():
                    builders[key].add_documents(ids, lengths)
                    tokens += int(lengths.sum())
                summary.tick(tokens=tokens)
            summary.kept = summary.docs
            if not summary.docs:  # megatron-core cannot mmap an empty .bin: refuse to write one
                raise CorpusError(f"{', '.join(job.input)}: no usable record ({summary.skips.total} lines "
                                  f"skipped: {dict(summary.skips.counts) or 'the input is empty'}); an empty "
                                  f"dataset cannot be read by megatron-core, so none was written")
            for i, key in enumerate(cfg.json_keys):
                builders[key].finalize(tmps[2 * i + 1])
    return {key: f"{cfg.output_prefix}_{key}_document" for key in cfg.json_keys}
