"""Which comparison pairs each rank feeds, step by step: the order and the sharding.

Pairs are read, rendered and padded by ``megatron_qwen.data.preference`` (ChatML, truncation
that keeps the end token, skip accounting, ``collate_pairs``); a micro-batch of B pairs is one
forward over 2B sequences, the B chosen rows first.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def epoch_order(num_pairs: int, seed: int, epoch: int) -> List[int]:
    """The shuffled pair order of one epoch: a function of (seed, epoch) only, so a resumed run
    and a run with a different number of ranks see the same global batches."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_pairs, generator=gen).tolist()


def step_micro_batches(order: Sequence[int], step_in_epoch: int, global_batch_size: int,
                       micro_batch_size: int, world_size: int, rank: int) -> List[List[int]]:
    """The pair indices this rank feeds, micro-batch by micro-batch, for one optimizer step.

    The global batch ``order[step*G:(step+1)*G]`` is cut into micro-batches handed out round
    robin over ranks; every micro-batch has the same size, so the mean of the per-micro-batch
    losses over all ranks and accumulation steps is the global-batch mean whatever the layout.
    """
    batch = order[step_in_epoch * global_batch_size:(step_in_epoch + 1) * global_batch_size]
    if len(batch) != global_batch_size:
        raise ValueError(f"step {step_in_epoch} is past the end of the epoch")
    micros = [batch[i:i + micro_batch_size] for i in range(0, global_batch_size, micro_batch_size)]
    return micros[rank::world_size]


def eval_shard(num_items: int, micro_batch_size: int, world_size: int, rank: int
               ) -> List[Tuple[List[int], List[bool]]]:
    """This rank's evaluation micro-batches: (indices, is-real) with the same count on every rank.

    Under ZeRO-3 each forward gathers parameters collectively, so every rank must run the same
    number of forwards; ranks short of items repeat item 0 and mark the repeat as not real.
    """
    mine = list(range(rank, num_items, world_size))
    per_rank = -(-num_items // world_size)
    steps = -(-per_rank // micro_batch_size)
    padded = mine + [0] * (steps * micro_batch_size - len(mine))
    real = [True] * len(mine) + [False] * (len(padded) - len(mine))
    return [(padded[i:i + micro_batch_size], real[i:i + micro_batch_size])
            for i in range(0, len(padded), micro_batch_size)]
