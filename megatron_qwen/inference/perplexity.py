"""Perplexity of a checkpoint at several context lengths with each combination of the
long-context techniques: the report's Table 3 (section 2.5).

A sample of length L is L + 1 tokens: the model reads the first L and is scored on predicting
each next one, so perplexity = exp(mean NLL over L predictions per sample). The same samples are
used for every technique at one length. ``packing=documents`` takes the first L + 1 tokens of
each document that long (the report's setting: long arXiv papers); ``packing=concat`` cuts the
documents joined by ``<|endoftext|>`` into consecutive L + 1 windows.

The forward runs through megatron-core's pipeline schedule (forward only), so any TP x PP x DP
layout works, on GPUs or CPU processes (torchrun + gloo); data-parallel ranks split the samples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from itertools import combinations
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_qwen.config import ConfigError, ParallelConfig
from megatron_qwen.inference.loading import LongContext, set_long_context
from megatron_qwen.inference.padded_vocab import token_nll, unwrap
from megatron_qwen.runtime.collectives import all_reduce_scalars

PACKINGS = ("documents", "concat")


# --------------------------------------------------------------------------- data


def load_documents(path: str, tokenizer=None, text_key: str = "text",
                   log=print) -> List[np.ndarray]:
    """Token ids of every document of a JSONL file (field ``text_key``, tokenized here) or of a
    megatron-core indexed dataset (``PREFIX`` of PREFIX.bin/PREFIX.idx, already tokenized).
    Unusable JSONL lines are skipped, counted and reported in one line."""
    if os.path.isfile(f"{path}.bin") and os.path.isfile(f"{path}.idx"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(path)
        return [np.asarray(dataset[i], dtype=np.int64) for i in range(len(dataset))]
    if not os.path.isfile(path):
        raise ConfigError(f"--data {path}: neither a JSONL file nor an indexed dataset "
                          f"({path}.bin + {path}.idx)")
    from megatron_qwen.data.corpus.jsonl import ReadOptions, SkipLog, read_jsonl
    from megatron_qwen.tokenizer import load_tokenizer

    tokenizer = tokenizer or load_tokenizer()
    skips = SkipLog(keep=3)
    texts = [doc.record[text_key] for doc in read_jsonl([path], ReadOptions(required_keys=(text_key,)), skips)]
    if skips.total:
        first = next(iter(p for places in skips.places.values() for p in places))
        log(f"{path}: skipped {skips.total} unusable line(s) "
            f"({', '.join(f'{k}={v}' for k, v in sorted(skips.counts.items()))}); first: {first}")
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]


def make_samples(docs: Sequence[np.ndarray], length: int, num_samples: int, packing: str,
                 eod: int) -> torch.Tensor:
    """[n, length + 1] token windows (n <= num_samples; 0 rows when the data is too short)."""
    if packing not in PACKINGS:
        raise ConfigError(f"--packing {packing!r}: choose {', '.join(PACKINGS)}")
    need = length + 1
    rows: List[np.ndarray] = []
    if packing == "documents":
        rows = [d[:need] for d in docs if len(d) >= need][:num_samples]
    else:
        stream = np.concatenate([np.append(d, eod) for d in docs]) if docs else np.zeros(0, np.int64)
        count = min(num_samples, len(stream) // need)
        rows = [stream[i * need:(i + 1) * need] for i in range(count)]
    if not rows:
        return torch.zeros(0, need, dtype=torch.long)
    return torch.from_numpy(np.stack(rows).astype(np.int64))


# --------------------------------------------------------------------------- forward


def _nll_loss_func(output_tensor: torch.Tensor):
    """Per-token NLL [b, s] -> (mean for the schedule, sums for us)."""
    nll = output_tensor.float()
    total = nll.sum()
    return total / nll.numel(), {"nll_sum": total.detach().clone(),
                                 "tokens": torch.tensor(float(nll.numel()), dtype=torch.float64)}


def _nll_forward_step(data_iterator, model, vocab_size: Optional[int] = None):
    batch = next(data_iterator)
    tokens, labels = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    gpt = unwrap(model)
    if vocab_size is None or not gpt.post_process or vocab_size >= gpt.vocab_size:
        return model(tokens, positions, None, labels=labels), _nll_loss_func
    logits = model(tokens, positions, None, runtime_gather_output=False)  # [b, s, V / TP]
    return token_nll(logits, labels, vocab_size), _nll_loss_func


@torch.no_grad()
def total_nll(model_chunks, samples: torch.Tensor, micro_batch_size: int = 1,
              vocab_size: Optional[int] = None) -> Tuple[float, int]:
    """Sum of next-token NLL and the number of scored tokens over ``samples`` [n, L + 1],
    identical on every rank (data-parallel ranks take every DP-th micro-batch). ``vocab_size``
    (the real vocabulary) keeps the padded embedding rows out of the softmax."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model_chunks[0].parameters()).device
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = [samples[i:i + micro_batch_size] for i in range(0, samples.size(0), micro_batch_size)]
    mine = [b.to(device) for j, b in enumerate(batches) if j % dp == dp_rank]
    nll, tokens = 0.0, 0.0
    schedule = get_forward_backward_func()
    for batch in mine:  # one schedule call per micro-batch: the last one may be smaller
        iterators = [iter([batch]) for _ in model_chunks]
        losses = schedule(
            forward_step_func=functools.partial(_nll_forward_step, vocab_size=vocab_size),
            data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
            model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
            num_microbatches=1, seq_length=batch.size(1) - 1, micro_batch_size=batch.size(0),
            forward_only=True)
        for item in losses or []:
            nll += float(item["nll_sum"])
            tokens += float(item["tokens"])
    contributes = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    nll, tokens = all_reduce_scalars([nll, tokens] if contributes else [0.0, 0.0], device=device)
    return nll, int(tokens)


def perplexity(model_chunks, samples: torch.Tensor, micro_batch_size: int = 1,
               vocab_size: Optional[int] = None) -> float:
    nll, count = total_nll(model_chunks, samples, micro_batch_size, vocab_size)
    return math.exp(nll / count) if count else float("nan")


# --------------------------------------------------------------------------- the table


def settings(combos: str, window_rule: str) -> List[LongContext]:
    """``table3``: the report's cumulative rows (plain, + NTK, + LogN, + windows);
    ``all``: every subset of the three techniques; or a comma list of names made of
    ``plain``, ``ntk``, ``logn``, ``window`` joined by ``+`` (e.g. ``plain,ntk+window``)."""
    def make(ntk: bool, logn: bool, window: bool) -> LongContext:
        return LongContext(dynamic_ntk=ntk, logn=logn, window_rule=window_rule if window else "none")

    if combos == "table3":
        return [make(False, False, False), make(True, False, False), make(True, True, False),
                make(True, True, True)]
    if combos == "all":
        out = []
        for k in range(4):
            for on in combinations(("ntk", "logn", "window"), k):
                out.append(make("ntk" in on, "logn" in on, "window" in on))
        return out
    out = []
    for name in combos.split(","):
        parts = set(p.strip() for p in name.split("+") if p.strip())
        unknown = parts - {"plain", "ntk", "logn", "window"}
        if unknown or not parts:
            raise ConfigError(f"--combinations {combos!r}: unknown technique(s) {sorted(unknown)}; "
                              "use table3, all, or names like plain,ntk,ntk+logn+window")
        out.append(make("ntk" in parts, "logn" in parts, "window" in parts))
    return out


def evaluate_table(model_chunks, docs: Sequence[np.ndarray], lengths: Sequence[int],
                   rows: Sequence[LongContext], num_samples: int, packing: str, eod: int,
                   micro_batch_size: int = 1, log=print,
                   vocab_size: Optional[int] = None) -> Dict[str, Dict[int, float]]:
    """{row label: {length: perplexity}} (nan where the data has no sample of that length)."""
    table: Dict[str, Dict[int, float]] = {r.label: {} for r in rows}
    try:
        for length in lengths:
            samples = make_samples(docs, length, num_samples, packing, eod)
            if samples.size(0) == 0:
                log(f"length {length}: no sample ({packing}: no document of {length + 1} tokens)")
            elif samples.size(0) < num_samples:
                log(f"length {length}: only {samples.size(0)} of {num_samples} samples available")
            for row in rows:
                set_long_context(model_chunks, row)
                table[row.label][length] = (perplexity(model_chunks, samples, micro_batch_size,
                                                       vocab_size)
                                            if samples.size(0) else float("nan"))
    finally:
        set_long_context(model_chunks, LongContext())
    return table


def format_table(table: Dict[str, Dict[int, float]], lengths: Sequence[int], title: str = "Model") -> str:
    """A Markdown table shaped like the report's Table 3."""
    head = f"| {title} | " + " | ".join(str(n) for n in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    body = [f"| {label} | " + " | ".join("n/a" if math.isnan(v) else f"{v:.2f}"
                                         for v in (row.get(n, float("nan")) for n in lengths)) + " |"
            for label, row in table.items()]
    return "\n".join([head, rule, *body])


# --------------------------------------------------------------------------- command line


def _lengths(text: str, train_length: int = 2) -> List[int]:
    """``--seq-lengths``: token counts, or multiples of the training length written ``4x``."""
    try:
        values = [int(float(x.strip()[:-1]) * train_length) if x.strip().endswith("x") else int(x)
                  for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seq-lengths {text!r}: expected comma-separated integers "
                          "(or multiples of the training length: 1x,4x,8x)") from None
    if not values or any(v < 2 for v in values):
        raise ConfigError(f"--seq-lengths {text!r}: expected lengths >= 2")
    return values


@dataclasses.dataclass
class PerplexityArgs:
    """tools/eval_ppl.py settings."""

    load: Optional[str] = None  # megatron-core torch_dist checkpoint directory
    data: Optional[str] = None  # JSONL file, or PREFIX of an indexed dataset (PREFIX.bin/.idx)
    text_key: str = "text"  # JSONL field with the document
    tokenizer: Optional[str] = None  # qwen.tiktoken path (default: the shipped one)
    seq_lengths: str = "1024,2048,4096,8192,16384"  # tokens, or multiples of L_train: 1x,4x,8x
    num_samples: int = 8  # samples per length
    packing: str = "documents"  # documents | concat
    combinations: str = "table3"  # table3 | all | e.g. plain,ntk,ntk+logn+window
    window_rule: Optional[str] = None  # default: linear:L_train/4:L_train (see docs/long_context.md)
    attention_backend: Optional[str] = None  # override the checkpoint's: sdpa | flash | unfused
    train_seq_length: Optional[int] = None  # override the checkpoint's training length (L_train)
    micro_batch_size: int = 1  # samples per forward
    bf16: Optional[bool] = None  # --bf16 / --no-bf16 (fp32); unset: bf16 on a GPU, fp32 on CPU
    dtype: Optional[str] = None  # bf16 | fp16 | fp32 (same as --bf16 / --no-bf16); unset: as above
    output: Optional[str] = None  # also write the table as JSON here

    def validate(self) -> None:
        if not self.load:
            raise ConfigError("--load is required (a megatron-core checkpoint directory)")
        if not self.data:
            raise ConfigError("--data is required (a JSONL file or an indexed dataset prefix)")
        _lengths(self.seq_lengths)
        if self.packing not in PACKINGS:
            raise ConfigError(f"--packing {self.packing!r}: choose {', '.join(PACKINGS)}")
        if self.num_samples < 1 or self.micro_batch_size < 1:
            raise ConfigError("--num-samples and --micro-batch-size must be >= 1")


@dataclasses.dataclass
class EvalPplConfig:
    """Perplexity at several lengths with the long-context techniques (report Table 3)."""

    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    eval: PerplexityArgs = dataclasses.field(default_factory=PerplexityArgs)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[int, float]]:
    import json

    from megatron_qwen.config import load_config
    from megatron_qwen.inference.loading import inactive_notice, load_model, requested_dtype
    from megatron_qwen.model.long_context import window_sizes_from_rule
    from megatron_qwen.tokenizer import load_tokenizer

    cfg = load_config(EvalPplConfig, argv, EvalPplConfig.__doc__)
    args = cfg.eval
    rank0 = lambda: not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0  # noqa: E731
    log = lambda msg: print(msg, flush=True) if rank0() else None  # noqa: E731
    overrides = {"attention_backend": args.attention_backend} if args.attention_backend else {}
    if args.train_seq_length:
        overrides["seq_length"] = args.train_seq_length
    try:
        model, model_cfg = load_model(args.load, cfg.parallel,
                                      requested_dtype(args.bf16, args.dtype), **overrides)
        window_rule = args.window_rule or f"linear:{max(1, model_cfg.seq_length // 4)}:{model_cfg.seq_length}"
        window_sizes_from_rule(window_rule, model_cfg.num_layers, model_cfg.seq_length)  # check early
        rows = settings(args.combinations, window_rule)
        tokenizer = load_tokenizer(args.tokenizer)
        docs = load_documents(args.data, tokenizer, args.text_key, log)
    except (ConfigError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    lengths = _lengths(args.seq_lengths, model_cfg.seq_length)
    log(f"{args.load}: trained at {model_cfg.seq_length} tokens; {len(docs)} documents; "
        f"windows: {window_rule}")
    notice = inactive_notice(model_cfg.seq_length, max(lengths), any(r.dynamic_ntk for r in rows),
                             any(r.logn for r in rows))
    if notice:
        log(notice)
    table = evaluate_table(model, docs, lengths, rows, args.num_samples, args.packing,
                           tokenizer.eod_id, args.micro_batch_size, log, model_cfg.vocab_size)
    log(format_table(table, lengths, title=Path(args.load).name))
    if args.output and rank0():
        out = Path(args.output)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"lengths": lengths, "window_rule": window_rule,
                                   "train_length": model_cfg.seq_length,
                                   "perplexity": {k: {str(n): v for n, v in row.items()}
                                                  for k, row in table.items()}}, indent=2))
        tmp.replace(out)
    return table
