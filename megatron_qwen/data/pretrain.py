"""The pretraining blend: megatron-core's GPTDataset over indexed corpora (report section 2.1).

Documents of every corpus are shuffled, concatenated with the EOD token between them and cut to
the context length by megatron-core's ``GPTDataset``; several corpora are mixed with weights by
``BlendedMegatronDatasetBuilder`` (``--data-path 0.7 web 0.3 code``). What is ours: checking the
corpora before anything is built (missing files, token ids beyond the vocabulary: one line each),
and the sampler that deals each global batch out to the data-parallel ranks from the number of
samples already consumed, so that a resumed run reads exactly the batches it would have read.
With ``--reset-attention-mask`` each sample also carries its documents' ``cu_seqlens`` (a new
document after each EOD), which the trainer passes as THD packed sequences: no dense mask.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_qwen.config import ConfigError
from megatron_qwen.model.varlen import padded_cu_seqlens

# Above this many tokens a corpus is checked on evenly spaced windows instead of read whole.
FULL_SCAN_TOKENS = 256 * 2**20
SCAN_WINDOWS, SCAN_WINDOW_TOKENS = 64, 2**20


class DatasetTokenizer:
    """What GPTDataset needs from a tokenizer for pre-tokenized data: the EOD id and vocab size.

    The dataset is already token ids; GPTDataset only reads ``eod`` (for masks/position resets),
    ``vocab_size`` (index dtype) and ``unique_identifiers`` (its cache key).
    """

    def __init__(self, eod: int, vocab_size: int):
        self.eod = eod
        self.vocab_size = vocab_size
        self.unique_identifiers = {"class": "QwenTokenizer", "eod": eod, "vocab_size": vocab_size}


def qwen_eod_id(tokenizer_path: Optional[str] = None) -> int:
    """``<|endoftext|>`` of the Qwen tokenizer (151643), read from the tokenizer itself."""
    from megatron_qwen.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path).eod_id


def check_corpus(prefix: str, vocab_size: int, split: Optional[str] = None) -> int:
    """Fail with one line when ``prefix`` is not a readable indexed corpus of in-vocab ids, or
    has too few documents for every split of ``split`` to get tokens (megatron-core would loop
    forever trying to fill an empty split). Returns the corpus's token count.
    """
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise ConfigError(f"--data-path {prefix}: no such file {prefix + suffix} "
                              f"(a corpus is PREFIX.bin + PREFIX.idx, as tools/preprocess_data.py writes them)")
    try:
        ds = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, OSError) as exc:
        raise ConfigError(f"--data-path {prefix}: not a megatron indexed dataset ({exc})") from None
    if len(ds) == 0:
        raise ConfigError(f"--data-path {prefix}: the corpus has no documents")
    lengths = ds.sequence_lengths
    if split is not None:
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix, parse_and_normalize_split)

        names = ("train", "valid", "test")
        for name, bounds in zip(names, convert_split_vector_to_split_matrix(parse_and_normalize_split(split))):
            if bounds is None:
                continue
            beg, end = (int(round(b * len(lengths))) for b in bounds)
            if int(lengths[beg:end].sum()) == 0:
                raise ConfigError(
                    f"--data-path {prefix}: its {len(lengths)} documents leave the {name} split of "
                    f"--split {split} without tokens; add data or set that split's weight to 0")
    tokens = numpy.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
    n = tokens.shape[0]
    if n == 0:
        raise ConfigError(f"--data-path {prefix}: the corpus has no tokens")
    if n <= FULL_SCAN_TOKENS:
        windows = [(0, n)]
    else:  # a sample: a corpus from another tokenizer has out-of-range ids all through it
        starts = numpy.linspace(0, n - SCAN_WINDOW_TOKENS, SCAN_WINDOWS).astype(numpy.int64)
        windows = [(int(s), int(s) + SCAN_WINDOW_TOKENS) for s in starts]
    top = max(int(tokens[a:b].max()) for a, b in windows)
    if top >= vocab_size:
        raise ConfigError(
            f"--data-path {prefix}: token id {top} >= vocab size {vocab_size}; the corpus was "
            f"tokenized with another tokenizer than the model's")
    return n


def split_sizes(train_iters: int, global_batch_size: int, eval_interval: Optional[int],
                eval_iters: int) -> list[int]:
    """Samples to draw per split (train, valid, test), as Megatron-LM counts them."""
    train = train_iters * global_batch_size
    evals = (train_iters // eval_interval + 1) if eval_interval else 1
    return [train, evals * eval_iters * global_batch_size, eval_iters * global_batch_size]


def build_pretrain_datasets(cfg, sizes: list[int], eod_id: Optional[int] = None):
    """(train, valid, test) GPTDatasets (or BlendedDatasets) for ``cfg`` (a PretrainConfig)."""
    prefixes, weights = cfg.data.blend()
    vocab = cfg.model.vocab_size
    for prefix in prefixes:
        check_corpus(prefix, vocab, cfg.data.split)
    if eod_id is None:
        eod_id = cfg.data.eod_id
    if eod_id is None:
        eod_id = qwen_eod_id(cfg.data.tokenizer_path)
    if eod_id >= vocab:
        raise ConfigError(f"EOD id {eod_id} is outside the model's vocabulary ({vocab})")
    gpt_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=(prefixes, weights),
        split=cfg.data.split,
        path_to_cache=cfg.data.data_cache_path,
        tokenizer=DatasetTokenizer(eod_id, vocab),
        reset_position_ids=cfg.data.reset_position_ids,
        reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=cfg.data.eod_mask_loss,
        # never a dense mask: separated documents go to the attention as cu_seqlens (THD)
        create_attention_mask=False,
    )
    # Every rank builds (rank 0 first, writing the index cache); no broadcast of batches needed.
    splits = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, gpt_config).build()
    if not cfg.data.reset_attention_mask:
        return splits
    return [None if ds is None else DocumentBoundaries(ds, eod_id) for ds in splits]


def document_lengths(tokens: torch.Tensor, eod_id: int) -> list[int]:
    """Lengths of the documents of one sample: a new one starts after each EOD token (megatron's
    ``reset_attention_mask`` rule in ``GPTDataset``)."""
    ends = (tokens == eod_id).nonzero().flatten().add(1).tolist()
    bounds = [0] + [e for e in ends if e < tokens.numel()] + [tokens.numel()]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


class DocumentBoundaries(torch.utils.data.Dataset):
    """GPTDataset samples with their documents' ``cu_seqlens`` (``--reset-attention-mask``):
    the trainer passes them to the model as THD packed sequences (model/varlen.py)."""

    def __init__(self, dataset, eod_id: int):
        self.dataset, self.eod_id = dataset, eod_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx):
        sample = dict(self.dataset[idx])
        sample.pop("attention_mask", None)
        tokens = sample["tokens"]
        sample["cu_seqlens"] = padded_cu_seqlens(document_lengths(tokens, self.eod_id), tokens.numel())
        return sample


class PretrainingSampler:
    """Deals out global batches: DP rank r takes its contiguous slice of every global batch.

    Starting from ``consumed_samples`` makes resumption exact: the sample order depends only on
    the dataset's own shuffle and the number of samples already trained on.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        if consumed_samples >= total_samples:
            raise ConfigError(f"no samples left: {consumed_samples} consumed of {total_samples}")
        self.total, self.consumed = total_samples, consumed_samples
        self.micro, self.rank, self.size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.micro * self.size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro * self.size
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.rank * self.micro
            yield list(range(first, first + self.micro))


def build_data_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                        dp_size: int, num_workers: int = 0, seed: int = 0) -> Optional[Iterator[dict]]:
    """An iterator of micro-batches (dicts of tensors) for this data-parallel rank.

    The loader draws its workers' base seed from its own generator (seeded with ``seed``), not
    from torch's default one: starting an iterator must not move the RNG that dropout uses, or a
    resumed run (which starts its iterator after restoring the RNG) would differ from an
    uninterrupted one from its first step."""
    if dataset is None or len(dataset) == 0:
        return None
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available(),
                                         persistent_workers=num_workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    return iter(loader)
