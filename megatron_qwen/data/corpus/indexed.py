"""JSONL to a megatron-core indexed dataset (``{prefix}_{key}_document.bin/.idx``).

Workers tokenize (the tokenizer is loaded once per process from its path, so the job pickles
small); the driver appends each document, in input order, with megatron-core's own
``IndexedDatasetBuilder``, so ``IndexedDataset`` reads the files back exactly as Megatron-LM's
``preprocess_data.py`` would have written them. One document is one sequence; with
``append_eod`` it ends with ``<|endoftext|>``. Token ids are int32 (the Qwen vocabulary does not
fit uint16). Each key's documents are written in the same order, so they align across keys; a
record missing any key is skipped (and counted) for all keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import unicodedata
import warnings
from typing import Optional

import numpy as np

from megatron_qwen.config import ConfigError
from megatron_qwen.tokenizer import load_tokenizer
from megatron_qwen.tokenizer.qwen import MAX_CHUNK_CHARS
from megatron_qwen.data.corpus.jsonl import ReadOptions
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


def output_paths(prefix: str, key: str) -> tuple:
    base = f"{prefix}_{key}_document"
    return f"{base}.bin", f"{base}.idx"


def encode_array(tok, text: str) -> np.ndarray:
    """``tok.encode(text)`` as an int32 array, without a Python list in between when possible.

    For texts the tokenizer sends straight to tiktoken (NFC, at most MAX_CHUNK_CHARS), tiktoken's
    ``encode_to_numpy`` returns the same ids as a buffer: no list of Python ints to build and
    convert, which is ~15% of the encoding cost. Longer texts take the tokenizer's own path.
    tests/test_corpus_preprocess.py checks the ids equal ``tok.encode`` document by document.
    """
    if len(text) <= MAX_CHUNK_CHARS:
        ids = tok._encoding.encode_to_numpy(unicodedata.normalize("NFC", text), disallowed_special=())
        return ids.view(np.int32)
    return np.asarray(tok.encode(text), dtype=np.int32)


class Encoder:
    """Worker side: the documents of a chunk as, per key, (all token ids, per-document lengths)."""

    def __init__(self, json_keys: list, append_eod: bool, tokenizer_path: Optional[str]):
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.tokenizer_path = tokenizer_path

    def __call__(self, docs: list) -> dict:
        tok = load_tokenizer(self.tokenizer_path)  # cached per process
        eod = np.array([tok.eod_id], dtype=np.int32)
        out = {}
        for key in self.json_keys:
            parts, lengths = [], []
            for doc in docs:
                ids = encode_array(tok, doc.record[key])
                parts.append(ids)
                if self.append_eod:
                    parts.append(eod)
                lengths.append(ids.size + self.append_eod)
            ids = np.concatenate(parts) if parts else np.empty(0, np.int32)
            out[key] = (ids, np.asarray(lengths, dtype=np.int64))
        return out


def build_indexed_dataset(cfg: PreprocessConfig, job: JobConfig, summary: Summary) -> dict:
    """Run the job; returns {key: prefix of the written dataset}."""
    with warnings.catch_warnings():  # megatron-core warns about optional GPU libraries on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tok = load_tokenizer(cfg.tokenizer_path)
    dtype = DType.optimal_dtype(tok.vocab_size)
    read = ReadOptions(required_keys=tuple(cfg.json_keys))
    encoder = Encoder(cfg.json_keys, cfg.append_eod, cfg.tokenizer_path)
    finals = [p for key in cfg.json_keys for p in output_paths(cfg.output_prefix, key)]
    with atomic_paths(*finals) as tmps:
        builders = {key: IndexedDatasetBuilder(tmps[2 * i], dtype=dtype)
                    for i, key in enumerate(cfg.json_keys)}
        with contextlib.ExitStack() as stack:
            for b in builders.values():
                stack.callback(b.data_file.close)
            for result in map_chunks(encoder, job, read, summary):
                tokens = 0
                for key, (ids, lengths) in result.items():
                    builder, start = builders[key], 0
                    for n in lengths.tolist():
                        builder.add_document(ids[start : start + n], [n])
                        start += n
                    tokens += start
                summary.tick(tokens=tokens)
            summary.kept = summary.docs
            for i, key in enumerate(cfg.json_keys):
                builders[key].finalize(tmps[2 * i + 1])
    return {key: f"{cfg.output_prefix}_{key}_document" for key in cfg.json_keys}
