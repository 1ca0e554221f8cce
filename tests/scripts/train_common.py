"""Shared by the trainer tests: small real-text corpora and configs for the tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import torch


def write_corpus(prefix: str, vocab_size: int | None = None, max_docs: int | None = None) -> int:
    """Python's reference docs (real English), Qwen-tokenized, EOD after each document, as a
    megatron-core indexed dataset. With ``vocab_size`` (a toy vocabulary) ids are folded into
    [0, vocab_size - 1) and EOD is vocab_size - 1. Returns the token count."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_qwen.data.real_corpus import python_doc_topics
    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    total = 0
    for i, doc in enumerate(python_doc_topics()):
        if max_docs is not None and i >= max_docs:
            break
        ids = tok.encode(doc["text"])
        if vocab_size is not None:
            ids = [t % (vocab_size - 1) for t in ids] + [vocab_size - 1]
        else:
            ids = ids + [tok.eod_id]
        builder.add_document(torch.tensor(ids, dtype=torch.int32), [len(ids)])
        total += len(ids)
    builder.finalize(prefix + ".idx")
    return total


def read_metrics(path) -> list[dict]:
    """The trainer's --metrics-file records of training iterations, in order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "lm_loss" in r]


def losses(path) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in read_metrics(path)}


def run_trainings(common: list, runs, out: str, only=(), refused=()) -> None:
    """Train each (name, flags) of ``runs`` in turn in this torchrun launch, ``common`` flags
    first, metrics to OUT/NAME.jsonl; ``only`` names a subset (debugging). A run named in
    ``refused`` must stop with a ConfigError, whose line goes to OUT/NAME.error. Tears the groups
    down."""
    from megatron_qwen.config import ConfigError, load_config
    from megatron_qwen.runtime import destroy, init_distributed
    from megatron_qwen.training.config import PretrainConfig
    from megatron_qwen.training.loop import train

    for name, flags in runs:
        if only and name not in only:
            continue
        cfg = load_config(PretrainConfig, common + flags + ["--metrics-file", f"{out}/{name}.jsonl"])
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        if name in refused:
            try:
                train(cfg)
            except ConfigError as exc:
                Path(out, f"{name}.error").write_text(str(exc))
            else:
                raise AssertionError(f"{name}: trained, expected a refusal")
        else:
            train(cfg)
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            print(f"done {name}", flush=True)
    destroy()
