"""SFT data: ChatML conversations from JSONL, packed into fixed-length samples (report 3.1).

Input: one conversation per line, ``{"messages": [{"role": "system"|"user"|"assistant",
"content": "..."}, ...]}``. Each is rendered by ``render_chatml`` (loss only on assistant content
and its ``<|im_end|>``). Lines that cannot be used are skipped, counted by reason and named with
``file:line`` (malformed JSON, invalid UTF-8, empty, unknown role, no assistant turn, too long
under ``drop``, ...).

A sample is what megatron-core's ``GPTModel.forward`` takes, as ``GPTDataset`` produces it:
``tokens``, ``labels`` (the next token), ``loss_mask`` (float), ``position_ids``, and the
document boundaries as ``cu_seqlens`` (int32 ``[s + 1]``, padded with -1; the trainer turns a
micro-batch into megatron-core's ``PackedSeqParams``, model/varlen.py), never a dense mask.

Packing (default): conversations, in a seeded random order, are placed first-fit into
``seq_length`` bins (looking back over the last ``PACK_LOOKBACK`` open bins). Inside a bin,
position ids restart at 0 for each conversation and each conversation is its own document of
the varlen attention, so packed conversations never see each other; a conversation's last token
predicts nothing (no label crosses a boundary). The unused tail is padding with
``<|endoftext|>``, zero loss, and its own document. With packing off, every conversation is one
padded sample (two documents: the conversation and its padding).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_qwen.model.varlen import padded_cu_seqlens
from megatron_qwen.tokenizer import DEFAULT_SYSTEM_PROMPT, ChatMLError, QwenTokenizer, render_chatml

PACK_LOOKBACK = 64
TRUNCATION_POLICIES = ("drop", "truncate")


@dataclasses.dataclass
class SFTDataArgs:
    """SFT data settings (a config group; the sequence length is the model's ``seq_length``)."""

    sft_data_path: Optional[str] = None  # JSONL file(s); several as a comma-separated list
    sft_packing: bool = True  # pack conversations into seq_length samples; false: pad each
    sft_truncation: str = "truncate"  # over-long conversations: truncate (keep the start) | drop
    sft_system_prompt: str = DEFAULT_SYSTEM_PROMPT  # for conversations without a system turn
    sft_seed: int = 1234  # order of conversations (and so the packing)

    def validate(self) -> None:
        from megatron_qwen.config import ConfigError

        if self.sft_truncation not in TRUNCATION_POLICIES:
            raise ConfigError(f"sft.sft_truncation={self.sft_truncation!r}: choose drop or truncate")

    @property
    def paths(self) -> List[str]:
        return [p.strip() for p in (self.sft_data_path or "").split(",") if p.strip()]


class SkipLog:
    """Skipped records: a count per reason and the first ``keep`` places (file:line: detail)."""

    def __init__(self, keep: int = 100):
        self.keep = keep
        self.counts: collections.Counter = collections.Counter()
        self.places: Dict[str, List[str]] = {}

    def add(self, reason: str, file: str, line: int, detail: str = "") -> None:
        self.counts[reason] += 1
        places = self.places.setdefault(reason, [])
        if len(places) < self.keep:
            places.append(f"{file}:{line}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "none"


def iter_jsonl_objects(paths: Sequence[str], skips: SkipLog) -> Iterator[Tuple[str, int, dict]]:
    """(file, line, object) for every JSON-object line; blank lines are ignored, bad ones
    (invalid UTF-8, malformed JSON, not an object) skipped into ``skips``."""
    for path in paths:
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise FileNotFoundError(f"{path}: cannot open ({exc.strerror})") from None
        with f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    skips.add("invalid_utf8", path, lineno, f"byte {exc.start}")
                    continue
                except (json.JSONDecodeError, RecursionError) as exc:
                    skips.add("malformed_json", path, lineno, getattr(exc, "msg", "nested too deeply"))
                    continue
                if not isinstance(record, dict):
                    skips.add("not_an_object", path, lineno, type(record).__name__)
                    continue
                yield path, lineno, record


@dataclasses.dataclass
class Conversation:
    ids: np.ndarray  # int64 token ids of the rendered conversation
    loss_mask: np.ndarray  # 1 where the token is a target
    where: str  # file:line

    @property
    def positions(self) -> int:
        """Training positions it fills: every token but the last predicts the next."""
        return len(self.ids) - 1


def load_conversations(
    paths: Union[str, os.PathLike, Sequence[str]],
    tokenizer: QwenTokenizer,
    seq_length: int,
    truncation: str = "truncate",
    system: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    skips: Optional[SkipLog] = None,
) -> tuple:
    """Render every usable conversation; returns (conversations, skips, number truncated)."""
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation={truncation!r}: choose drop or truncate")
    paths = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
    skips = skips if skips is not None else SkipLog()
    convs: List[Conversation] = []
    truncated = 0
    for file, line, record in iter_jsonl_objects(paths, skips):
        messages = record.get("messages")
        if not isinstance(messages, list):
            skips.add("bad_conversation", file, line, "'messages' is missing or not a list")
            continue
        if not messages:
            skips.add("empty", file, line, "'messages' is empty")
            continue
        try:
            ids, mask = render_chatml(messages, tokenizer, system=system)
        except ChatMLError as exc:
            skips.add(exc.reason, file, line, str(exc))
            continue
        if not any(m.get("role") == "assistant" for m in messages):
            skips.add("no_assistant_turn", file, line)
            continue
        if len(ids) - 1 > seq_length:
            if truncation == "drop":
                skips.add("too_long", file, line, f"{len(ids)} tokens > seq_length + 1")
                continue
            ids, mask = ids[: seq_length + 1], mask[: seq_length + 1]
            if not any(mask[1:]):
                skips.add("no_target_after_truncation", file, line, f"first {seq_length + 1} tokens")
                continue
            truncated += 1
        convs.append(Conversation(np.asarray(ids, np.int64), np.asarray(mask, np.uint8), f"{file}:{line}"))
    return convs, skips, truncated


def pack(lengths: Sequence[int], capacity: int, lookback: int = PACK_LOOKBACK) -> List[List[int]]:
    """First-fit bins of item indices (in the given order), searching the last ``lookback`` bins."""
    bins: List[List[int]] = []
    free: List[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {i} has {n} positions > capacity {capacity}")
        for b in range(max(0, len(bins) - lookback), len(bins)):
            if free[b] >= n:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return bins


class SFTDataset(torch.utils.data.Dataset):
    """Packed (or padded) SFT samples; deterministic given ``seed``."""

    def __init__(
        self,
        paths: Union[str, os.PathLike, Sequence[str]],
        tokenizer: QwenTokenizer,
        seq_length: int,
        packing: bool = True,
        truncation: str = "truncate",
        seed: int = 1234,
        system: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    ):
        if seq_length < 2:
            raise ValueError(f"seq_length={seq_length} must be >= 2")
        self.seq_length = seq_length
        self.pad_id = tokenizer.pad
        self.conversations, self.skips, self.truncated = load_conversations(
            paths, tokenizer, seq_length, truncation, system
        )
        order = np.random.default_rng(seed).permutation(len(self.conversations)).tolist()
        if packing:
            bins = pack([self.conversations[i].positions for i in order], seq_length)
            self.samples = [[order[k] for k in b] for b in bins]
        else:
            self.samples = [[i] for i in order]

    @classmethod
    def from_args(cls, args: SFTDataArgs, tokenizer: QwenTokenizer, seq_length: int) -> "SFTDataset":
        return cls(args.paths, tokenizer, seq_length, args.sft_packing, args.sft_truncation,
                   args.sft_seed, args.sft_system_prompt)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        s = self.seq_length
        tokens = np.full(s, self.pad_id, np.int64)
        labels = np.full(s, self.pad_id, np.int64)
        loss_mask = np.zeros(s, np.float32)
        position_ids = np.zeros(s, np.int64)
        lengths = []
        offset = 0
        for ci in self.samples[idx]:
            conv = self.conversations[ci]
            n = conv.positions
            tokens[offset : offset + n] = conv.ids[:-1]
            labels[offset : offset + n] = conv.ids[1:]
            loss_mask[offset : offset + n] = conv.loss_mask[1:]
            position_ids[offset : offset + n] = np.arange(n)
            lengths.append(n)
            offset += n
        position_ids[offset:] = np.arange(s - offset)
        if offset < s:
            lengths.append(s - offset)  # the padding tail is a document of its own
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": padded_cu_seqlens(lengths, s),
        }

    @property
    def stats(self) -> dict:
        used = sum(c.positions for c in self.conversations)
        return {
            "conversations": len(self.conversations),
            "samples": len(self.samples),
            "truncated": self.truncated,
            "skipped": self.skips.total,
            "skipped_by_reason": dict(self.skips.counts),
            "fill": used / max(1, len(self.samples) * self.seq_length),
        }

    def describe(self) -> str:
        st = self.stats
        return (f"SFT data: {st['conversations']} conversations -> {st['samples']} samples of "
                f"{self.seq_length} tokens ({st['fill']:.1%} filled); {st['truncated']} truncated; "
                f"{st['skipped']} skipped ({self.skips.summary()})")


# --------------------------------------------------------------------------- trainer hook


class EpochDataset(torch.utils.data.Dataset):
    """``num_samples`` samples drawn epoch after epoch from ``dataset``, reshuffled per epoch
    (seeded), because the trainer asks for train_iters x global_batch_size samples."""

    def __init__(self, dataset, num_samples: int, seed: int):
        if len(dataset) == 0 and num_samples > 0:
            raise ValueError("the SFT split is empty: no sample to draw")
        self.dataset, self.num_samples, self.seed = dataset, num_samples, seed
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int):
        epoch, j = divmod(idx, len(self.dataset))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return self.dataset[int(self._order[j])]


def sft_args_from(cfg) -> SFTDataArgs:
    """The SFT settings of a trainer config: an ``sft`` group if it has one, else the ``sft_*``
    fields of its ``data`` group (missing ones take SFTDataArgs' defaults)."""
    group = getattr(cfg, "sft", None)
    if isinstance(group, SFTDataArgs):
        return group
    defaults = SFTDataArgs()
    values = {f.name: getattr(cfg.data, f.name, getattr(defaults, f.name))
              for f in dataclasses.fields(SFTDataArgs)}
    if getattr(cfg, "train", None) is not None and not hasattr(cfg.data, "sft_seed"):
        values["sft_seed"] = cfg.train.seed
    args = SFTDataArgs(**values)
    args.validate()
    return args


def build_sft_datasets(cfg, sizes: Sequence[int]):
    """(train, valid, test) for the trainer's ``--task sft``; ``sizes`` are samples per split.

    The packed samples (already in seeded random order) are divided by ``--split`` weights; an
    empty split is None. The tokenizer is ``--tokenizer-path`` (default: Qwen's)."""
    from megatron_qwen.config import ConfigError
    from megatron_qwen.tokenizer import load_tokenizer

    args = sft_args_from(cfg)
    if not args.paths:
        raise ConfigError("--task sft needs --sft-data-path FILE.jsonl")
    tokenizer = load_tokenizer(getattr(cfg.data, "tokenizer_path", None))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}")
    full = SFTDataset.from_args(args, tokenizer, cfg.model.seq_length)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(full.describe(), flush=True)
        for places in full.skips.places.values():
            for place in places[:5]:
                print(f"  skipped {place}", flush=True)
    weights = [float(w) for w in getattr(cfg.data, "split", "100,0,0").replace("/", ",").split(",") if w.strip()]
    weights = (weights + [0.0, 0.0, 0.0])[:3]
    bounds = np.round(np.cumsum([0.0] + weights) / sum(weights) * len(full)).astype(int)
    out = []
    for i in range(3):
        part = torch.utils.data.Subset(full, range(bounds[i], bounds[i + 1]))
        out.append(EpochDataset(part, sizes[i], args.sft_seed + i) if len(part) and sizes[i] else None)
    if out[0] is None:
        raise ConfigError(f"--sft-data-path {args.sft_data_path}: no training sample ({full.describe()})")
    return tuple(out)
