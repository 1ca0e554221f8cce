"""Scoring conversations with a trained reward model (``tools/score_reward.py``).

Single process, plain PyTorch: a reward-model export is one ordinary HF model plus a head, so
scoring needs no DeepSpeed. Conversations are rendered in ChatML like the training pairs and the
reward is read at the final ``<|im_end|>``; over-long conversations keep their last
``seq_length`` tokens (the end token and the response survive, the prompt's start goes): the
rendering and the rule are the preference data's (``render_reply``), so a scored conversation
gets exactly the reward its response had as a training pair.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from megatron_qwen.config import ConfigError, load_config
from megatron_qwen.data.preference import render_reply
from megatron_qwen.data.sft import SkipLog, iter_jsonl_objects
from megatron_qwen.rlhf import hf_model
from megatron_qwen.rlhf.heads import gather_at
from megatron_qwen.rlhf.reward_config import RMModelConfig
from megatron_qwen.rlhf.reward_pairs import load_rm_tokenizer
from megatron_qwen.tokenizer import ChatMLError


@dataclasses.dataclass
class ScoreDataConfig:
    """What to score (group ``data``)."""

    input_path: str = ""  # JSONL, one {"messages": [...]} per line, ending with an assistant turn
    output_path: str = ""  # JSONL: each scored input line + "line", "reward" (+ "reward_normalized")
    seq_length: int = 2048  # longest conversation in tokens (longer: cut from the left)
    micro_batch_size: int = 8  # conversations per forward
    dtype: str = "float32"  # float32 | bfloat16

    def validate(self) -> None:
        if not self.input_path or not self.output_path:
            raise ConfigError("data.input_path and data.output_path are required")
        if self.micro_batch_size < 1:
            raise ConfigError("data.micro_batch_size must be >= 1")
        if self.dtype not in hf_model.DTYPES:
            raise ConfigError(f"data.dtype={self.dtype!r}: choose float32 or bfloat16")


@dataclasses.dataclass
class ScoreConfig:
    """Score a JSONL of conversations with a reward-model export directory."""

    model: RMModelConfig = dataclasses.field(default_factory=RMModelConfig)
    data: ScoreDataConfig = dataclasses.field(default_factory=ScoreDataConfig)


def render_for_reward(messages, tokenizer, seq_length: int) -> List[int]:
    """ChatML ids of a conversation ending with the assistant turn to score, as a pair's reply."""
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
            or messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
        raise ChatMLError("the last message must be the assistant turn to score", "bad_conversation")
    ids, _ = render_reply(messages[:-1], messages[-1]["content"], tokenizer, seq_length)
    return ids


@torch.no_grad()
def score_ids(model, rows: Sequence[List[int]], pad_id: int, micro_batch_size: int) -> List[float]:
    """Rewards at the last token of each id list (right-padded batches)."""
    out: List[float] = []
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start:start + micro_batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        end = torch.tensor([len(r) - 1 for r in chunk])
        out += gather_at(model(ids, mask), end).tolist()
    return out


def score_file(cfg: ScoreConfig) -> dict:
    """Score ``cfg.data.input_path`` into ``cfg.data.output_path``; returns counts and stats."""
    tokenizer = load_rm_tokenizer(cfg.model.tokenizer_path, cfg.model.model_path)
    model = hf_model.load_with_head(cfg.model.model_path, cfg.data.dtype, require_head=True).eval()
    stats = hf_model.load_reward_stats(cfg.model.model_path)
    records, rows = [], []
    src = Path(cfg.data.input_path)
    if not src.is_file():
        raise ConfigError(f"data.input_path={src}: no such file")
    skips = SkipLog()
    for file, lineno, rec in iter_jsonl_objects([str(src)], skips):
        if "messages" not in rec:
            skips.add("bad_conversation", file, lineno, 'expected an object with "messages"')
            continue
        try:
            ids = render_for_reward(rec["messages"], tokenizer, cfg.data.seq_length)
        except ChatMLError as exc:
            skips.add(exc.reason, file, lineno, str(exc))
            continue
        records.append((lineno, rec))
        rows.append(ids)
    # longest first keeps padding low; scores go back to input order
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    scores = score_ids(model, [rows[i] for i in order], tokenizer.pad, cfg.data.micro_batch_size)
    rewards = [0.0] * len(rows)
    for i, s in zip(order, scores):
        rewards[i] = s
    out = Path(cfg.data.output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for (lineno, rec), r in zip(records, rewards):
            row = {**rec, "line": lineno, "reward": r}
            if stats is not None:
                row["reward_normalized"] = (r - stats["mean"]) / max(stats["std"], 1e-8)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    n = len(rewards)
    mean = sum(rewards) / n if n else float("nan")
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n) if n else float("nan")
    places = [p for reason in skips.places.values() for p in reason]
    for place in places:
        print(f"skipped {place}", file=sys.stderr)
    return {"scored": n, "skipped": skips.total, "skipped_by_reason": dict(skips.counts),
            "skipped_lines": sorted(int(re.match(re.escape(str(src)) + r":(\d+):", p).group(1))
                                    for p in places),
            "mean": mean, "std": std, "output": str(out)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = load_config(ScoreConfig, argv, description=ScoreConfig.__doc__)
    try:
        summary = score_file(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    print(json.dumps(summary))
    return summary
