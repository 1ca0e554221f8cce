"""PPO-ptx batches: pretraining text from a Megatron indexed dataset (``PREFIX.bin/.idx``) read
with megatron-core's ``IndexedDataset``, for the language-modelling term added to the actor loss.

The batch for (step, rank) is a pure function of the seed, so resume needs no extra state and
one process and N processes see the same global set of documents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class PtxError(ValueError):
    """A pretraining dataset that cannot be used (message names the prefix)."""


class PtxBatches:
    def __init__(self, path_prefix: str, seq_length: int, batch_size: int, seed: int,
                 pad_token_id: int, vocab_size: int | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        prefix = str(path_prefix)
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise PtxError(f"ptx.ptx_data_path={prefix}: {prefix + suffix} does not exist")
        try:
            self.dataset = IndexedDataset(prefix)
        except Exception as exc:  # a corrupt .idx surfaces as struct/assert errors deep inside
            raise PtxError(f"ptx.ptx_data_path={prefix}: not a readable indexed dataset ({exc})") from None
        lengths = np.asarray(self.dataset.sequence_lengths)
        # documents of one token carry no next-token target
        self.usable = np.nonzero(lengths >= 2)[0]
        if len(self.usable) == 0:
            raise PtxError(f"ptx.ptx_data_path={prefix}: no document with at least 2 tokens")
        self.seq_length, self.batch_size, self.seed = seq_length, batch_size, seed
        self.pad_token_id, self.vocab_size = pad_token_id, vocab_size
        self.prefix = prefix

    def _doc(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, len(self.usable))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.usable))
        return self.dataset.get(int(self.usable[order[i]]), length=None)[: self.seq_length]

    def batch(self, update: int, rank: int, world_size: int) -> dict:
        """Batch number ``update`` (counted over the whole run) for this rank:
        ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on padding)."""
        if self.batch_size % world_size:
            raise PtxError(f"ptx.ptx_batch_size={self.batch_size} is not divisible by the "
                           f"{world_size} data-parallel ranks")
        per_rank = self.batch_size // world_size
        first = update * self.batch_size + rank * per_rank
        docs = [self._doc(first + j) for j in range(per_rank)]
        width = max(len(d) for d in docs)
        ids = torch.full((per_rank, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((per_rank, width), dtype=torch.long)
        for j, d in enumerate(docs):
            ids[j, : len(d)] = torch.from_numpy(d.astype(np.int64))
            mask[j, : len(d)] = 1
        if self.vocab_size is not None and int(ids.max()) >= self.vocab_size:
            raise PtxError(f"ptx.ptx_data_path={self.prefix}: token id {int(ids.max())} >= the actor's "
                           f"vocabulary size {self.vocab_size}")
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
