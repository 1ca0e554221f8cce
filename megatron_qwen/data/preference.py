"""Preference pairs for the reward model (report 3.2.1): a prompt with a chosen and a rejected reply.

Input: one pair per JSONL line, ``{"prompt": [messages] | "text", "chosen": str, "rejected":
str}``; a string prompt is one user turn, and a message list must end with a user turn. Each reply
is rendered as the assistant turn after the prompt (``render_chatml``), so both sequences end with
the reply's ``<|im_end|>``: the *end token* where the reward head reads the reward.

Truncation keeps the end token: a sequence longer than ``seq_length`` keeps its last
``seq_length`` tokens (the prompt is cut from the left, the system turn first), so the end token
is always the last token, at index ``len(ids) - 1``. Truncated pairs are counted.

Skipped, counted and named by ``file:line``: invalid UTF-8, malformed JSON, a missing or
wrongly typed field (``bad_pair``), an unknown role, a prompt not ending with a user turn
(``bad_prompt``) and identical chosen/rejected replies (``identical_pair``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from megatron_qwen.data.sft import SkipLog, iter_jsonl_objects
from megatron_qwen.tokenizer import DEFAULT_SYSTEM_PROMPT, ChatMLError, QwenTokenizer, render_chatml


@dataclasses.dataclass
class PreferencePair:
    chosen: np.ndarray  # int64 ids; the last one is the reply's <|im_end|>
    rejected: np.ndarray
    where: str  # file:line

    @property
    def chosen_end(self) -> int:
        return len(self.chosen) - 1

    @property
    def rejected_end(self) -> int:
        return len(self.rejected) - 1


def render_reply(prompt: List[dict], reply: str, tokenizer: QwenTokenizer, seq_length: int,
                 system: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> tuple:
    """(ids ending with the reply's <|im_end|>, truncated?) keeping at most the last seq_length."""
    ids, _ = render_chatml([*prompt, {"role": "assistant", "content": reply}], tokenizer, system=system)
    if len(ids) > seq_length:
        return ids[-seq_length:], True
    return ids, False


def load_preference_pairs(
    paths: Union[str, os.PathLike, Sequence[str]],
    tokenizer: QwenTokenizer,
    seq_length: int,
    system: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    skips: Optional[SkipLog] = None,
) -> tuple:
    """Render every usable pair; returns (pairs, skips, number of truncated pairs)."""
    paths = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
    skips = skips if skips is not None else SkipLog()
    pairs: List[PreferencePair] = []
    truncated = 0
    for file, line, record in iter_jsonl_objects(paths, skips):
        prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not isinstance(chosen, str) or not isinstance(rejected, str):
            skips.add("bad_pair", file, line, "needs prompt (list or string), chosen and rejected (strings)")
            continue
        if chosen == rejected:
            skips.add("identical_pair", file, line)
            continue
        if not prompt or not isinstance(prompt[-1], dict) or prompt[-1].get("role") != "user":
            skips.add("bad_prompt", file, line, "the prompt must end with a user turn")
            continue
        try:
            chosen_ids, cut_c = render_reply(prompt, chosen, tokenizer, seq_length, system)
            rejected_ids, cut_r = render_reply(prompt, rejected, tokenizer, seq_length, system)
        except ChatMLError as exc:
            skips.add(exc.reason, file, line, str(exc))
            continue
        truncated += cut_c or cut_r
        pairs.append(PreferencePair(np.asarray(chosen_ids, np.int64), np.asarray(rejected_ids, np.int64),
                                    f"{file}:{line}"))
    return pairs, skips, truncated


class PreferenceDataset(torch.utils.data.Dataset):
    """Rendered preference pairs; use ``collate_pairs`` to batch them."""

    def __init__(self, paths, tokenizer: QwenTokenizer, seq_length: int,
                 system: Optional[str] = DEFAULT_SYSTEM_PROMPT):
        self.seq_length = seq_length
        self.pad_id = tokenizer.pad
        self.pairs, self.skips, self.truncated = load_preference_pairs(paths, tokenizer, seq_length, system)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        p = self.pairs[idx]
        return {"chosen_ids": torch.from_numpy(p.chosen), "rejected_ids": torch.from_numpy(p.rejected)}

    def describe(self) -> str:
        return (f"preference data: {len(self.pairs)} pairs, {self.truncated} truncated, "
                f"{self.skips.total} skipped ({self.skips.summary()})")


def collate_pairs(batch: Sequence[Dict[str, torch.Tensor]], pad_id: int,
                  pad_to: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Stack B pairs into 2B right-padded rows, the B chosen first, then the B rejected.

    Returns ``input_ids`` [2B, L], ``attention_mask`` [2B, L] (1 = real token, the Hugging Face
    convention) and ``end_index`` [2B] (position of each row's final <|im_end|>)."""
    rows = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    length = max(len(r) for r in rows) if pad_to is None else pad_to
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"row {i} has {len(r)} tokens > pad_to={length}")
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
    end_index = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "end_index": end_index}
