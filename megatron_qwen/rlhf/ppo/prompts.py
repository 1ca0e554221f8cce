"""The PPO prompt set: a JSONL file read once, tokenised, and served in a seeded order.

Each line is one of ``{"prompt": "text"}`` (rendered as a ChatML user turn with the generation
prompt), ``{"messages": [{"role": ..., "content": ...}, ...]}`` (a conversation to continue) or
``{"input_ids": [int, ...]}`` (already tokenised). Bad lines are skipped, counted and reported with
their line number; a file with no usable prompt is an error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_qwen.tokenizer import ChatMLError, render_chatml_prompt

log = logging.getLogger(__name__)


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file (and line)."""


def load_prompts(path: str | Path, tokenizer=None, max_prompt_length: int = 512,
                 vocab_size: Optional[int] = None) -> tuple[list[list[int]], dict]:
    """Read ``path``; return the token-id prompts and a report
    ``{"read", "skipped", "reasons", "truncated"}``.

    Prompts longer than ``max_prompt_length`` keep their last tokens (the generation prompt);
    they are counted in ``truncated`` and logged with the first few line numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{path}: no such prompt file")
    prompts: list[list[int]] = []
    skipped: dict[str, int] = {}
    first_errors: list[str] = []
    truncated: list[int] = []  # line numbers of prompts cut to max_prompt_length

    def skip(lineno: int, why: str, detail: str = "") -> None:
        skipped[why] = skipped.get(why, 0) + 1
        if len(first_errors) < 5:
            first_errors.append(f"{path}:{lineno}: {why}{f' ({detail})' if detail else ''}")

    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skip(lineno, "invalid UTF-8")
                continue
            except json.JSONDecodeError:
                skip(lineno, "malformed JSON")
                continue
            if not isinstance(record, dict):
                skip(lineno, "not a JSON object")
                continue
            if "input_ids" in record:
                ids = record["input_ids"]
                if not (isinstance(ids, list) and ids and all(isinstance(i, int) and i >= 0 for i in ids)):
                    skip(lineno, "input_ids is not a non-empty list of token ids")
                    continue
                if vocab_size is not None and max(ids) >= vocab_size:
                    skip(lineno, f"input_ids has a token id >= vocab size {vocab_size}")
                    continue
            else:
                if isinstance(record.get("prompt"), str) and record["prompt"].strip():
                    messages = [{"role": "user", "content": record["prompt"]}]
                elif isinstance(record.get("messages"), list) and record["messages"]:
                    messages = record["messages"]
                else:
                    skip(lineno, "no usable 'prompt', 'messages' or 'input_ids' field")
                    continue
                if tokenizer is None:
                    raise PromptError(f"{path}:{lineno}: text prompts need a tokenizer")
                try:
                    ids = render_chatml_prompt(messages, tokenizer)
                except ChatMLError as exc:
                    skip(lineno, "bad messages", str(exc))
                    continue
            if len(ids) > max_prompt_length:
                truncated.append(lineno)
            prompts.append(ids[-max_prompt_length:])
    n_skipped = sum(skipped.values())
    if n_skipped:
        log.warning("%s: skipped %d bad line(s): %s; first: %s", path, n_skipped, skipped, "; ".join(first_errors))
    if truncated:
        log.warning("%s: %d prompt(s) longer than max_prompt_length=%d kept their last %d tokens; lines %s",
                    path, len(truncated), max_prompt_length, max_prompt_length,
                    ", ".join(map(str, truncated[:5])) + (", ..." if len(truncated) > 5 else ""))
    if not prompts:
        raise PromptError(f"{path}: no usable prompt (skipped {n_skipped} line(s): {skipped})")
    return prompts, {"read": len(prompts), "skipped": n_skipped, "reasons": skipped,
                     "truncated": len(truncated)}


class PromptSampler:
    """Global prompt order: a fresh seeded permutation per epoch; ``position`` counts prompts
    served so far and is all that a checkpoint needs to continue the same order."""

    def __init__(self, num_prompts: int, seed: int, position: int = 0):
        self.num_prompts, self.seed, self.position = num_prompts, seed, position

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def next_indices(self, count: int) -> list[int]:
        out = []
        for p in range(self.position, self.position + count):
            epoch, i = divmod(p, self.num_prompts)
            out.append(int(self._order(epoch)[i]))
        self.position += count
        return out
