"""The scalar head shared by the reward model and the PPO critic, and end-token pooling.

One head class, two readings: the reward model reads its output at the end token of the
response (one reward per sequence); the critic reads it at every token (one value per token).
Because the critic is the reward model with a different reading, PPO starts its critic from a
reward-model export with no conversion.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ScalarHead(nn.Module):
    """hidden state -> one scalar per token (a linear map with no bias).

    No bias: the pairwise loss only sees reward differences, so a bias would never train; the
    reward's offset is tracked instead by the mean/std saved with the export.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=False)
        # Outputs of order 1 for a unit-RMS (post-norm) hidden state.
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(hidden_size + 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, s, h] -> [b, s] in float32 (the loss and the statistics want full precision)."""
        return self.proj(hidden).squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token in each row of a [b, s] 0/1 mask (left or right padding)."""
    seq = attention_mask.shape[1]
    positions = torch.arange(seq, device=attention_mask.device).expand_as(attention_mask)
    index = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)
    if (index < 0).any():
        raise ValueError("attention_mask has a row with no real token")
    return index


def last_index_of(input_ids: torch.Tensor, token_id: int, attention_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Position of the last ``token_id`` in each row (the final ``<|im_end|>``), -1 where absent."""
    hit = input_ids == token_id
    if attention_mask is not None:
        hit = hit & attention_mask.bool()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(hit, positions, torch.full_like(positions, -1)).amax(dim=1)


def gather_at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[i, index[i]] for a [b, s] tensor: the reward read at each sequence's end token."""
    if index.shape != values.shape[:1]:
        raise ValueError(f"end index has shape {tuple(index.shape)} for {values.shape[0]} sequences")
    if ((index < 0) | (index >= values.shape[1])).any():
        raise ValueError(f"end index out of range [0, {values.shape[1]}): {index.tolist()}")
    return values.gather(1, index.long().unsqueeze(1)).squeeze(1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row reads like an unpadded one."""
    positions = attention_mask.long().cumsum(dim=1) - 1
    return positions.clamp(min=0)
