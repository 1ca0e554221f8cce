"""tools/generate.py: one prompt, a JSONL of prompts, or an interactive ChatML chat, from a
megatron-core checkpoint (TP on GPUs or CPU processes; PP is not used for generation).

Prompts are plain text completions unless ``--chat-format`` (or ``--chat``, or a JSONL record
with ``messages``) renders them as ChatML with the assistant turn open; chat replies stop at
``<|im_end|>``, completions at ``<|endoftext|>``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from megatron_qwen.config import ConfigError, ParallelConfig
from megatron_qwen.inference.generation import SamplingParams, generate
from megatron_qwen.inference.loading import LongContext, set_long_context


@dataclasses.dataclass
class GenerateArgs:
    """What to generate from and how."""

    load: Optional[str] = None  # megatron-core torch_dist checkpoint directory
    prompt: Optional[str] = None  # one prompt
    input: Optional[str] = None  # JSONL: {"prompt": str} or {"messages": [...]} per line
    output: Optional[str] = None  # JSONL of results (default: stdout)
    chat: bool = False  # interactive multi-turn ChatML chat on stdin (vs --chat-format: one-shot prompts)
    chat_format: bool = False  # --prompt / {"prompt"} as a ChatML user turn, not a completion
    system: str = "You are a helpful assistant."  # system message of ChatML prompts
    tokenizer: Optional[str] = None  # qwen.tiktoken path (default: the shipped one)
    micro_batch_size: int = 8  # prompts generated together
    use_kv_cache: bool = True  # reuse keys/values between steps (--no-use-kv-cache recomputes)
    use_dynamic_ntk: bool = False  # NTK-aware RoPE base past the training length (report 2.5)
    use_logn_attn: bool = False  # LogN query scaling past the training length (report 2.5)
    window_rule: str = "none"  # per-layer attention windows: none | uniform:W | linear:MIN:MAX
    attention_backend: Optional[str] = None  # override the checkpoint's: sdpa | flash | unfused
    train_seq_length: Optional[int] = None  # override the checkpoint's training length (L_train)
    bf16: Optional[bool] = None  # --bf16 / --no-bf16 (fp32); unset: bf16 on a GPU, fp32 on CPU
    dtype: Optional[str] = None  # bf16 | fp16 | fp32 (same as --bf16 / --no-bf16); unset: as above

    def validate(self) -> None:
        if not self.load:
            raise ConfigError("--load is required (a megatron-core checkpoint directory)")
        modes = sum([self.prompt is not None, self.input is not None, self.chat])
        if modes != 1:
            raise ConfigError("give exactly one of --prompt TEXT, --input prompts.jsonl, --chat")
        if self.micro_batch_size < 1:
            raise ConfigError("--micro-batch-size must be >= 1")


@dataclasses.dataclass
class GenerateConfig:
    """Text generation and ChatML chat from a megatron-core Qwen checkpoint."""

    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    generate: GenerateArgs = dataclasses.field(default_factory=GenerateArgs)
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def read_prompt_records(path: str) -> List[dict]:
    """Records of a prompts JSONL; a bad line is a one-line error naming it."""
    from megatron_qwen.tokenizer.chatml import ChatMLError, check_messages

    if not Path(path).is_file():
        raise ConfigError(f"--input {path}: no such file")
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{path}:{number}: not a JSON line ({exc})") from None
            if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str)
                                                    or isinstance(record.get("messages"), list)):
                raise ConfigError(f"{path}:{number}: expected an object with a string 'prompt' "
                                  "or a 'messages' list")
            if "messages" in record and not isinstance(record.get("prompt"), str):
                try:
                    check_messages(record["messages"])
                except ChatMLError as exc:
                    raise ConfigError(f"{path}:{number}: {exc}") from None
            records.append(record)
    if not records:
        raise ConfigError(f"--input {path}: no prompts")
    return records


class Generator:
    """A loaded model, its tokenizer and the sampling settings."""

    def __init__(self, model, model_cfg, tokenizer, sampling: SamplingParams, use_cache: bool = True):
        self.model, self.model_cfg, self.tokenizer = model, model_cfg, tokenizer
        self.sampling, self.use_cache = sampling, use_cache

    def ids_of(self, record: dict, chat_format: bool, system: Optional[str]) -> List[int]:
        from megatron_qwen.tokenizer.chatml import render_chatml_prompt

        if isinstance(record.get("messages"), list) and not isinstance(record.get("prompt"), str):
            return render_chatml_prompt(record["messages"], self.tokenizer, system=system)
        if chat_format:
            return render_chatml_prompt([{"role": "user", "content": record["prompt"]}],
                                        self.tokenizer, system=system)
        return self.tokenizer.encode(record["prompt"])

    def complete(self, prompts: List[List[int]], chat: bool) -> List[List[int]]:
        stops = [self.tokenizer.im_end_id, self.tokenizer.eod_id] if chat else [self.tokenizer.eod_id]
        return generate(self.model, prompts, self.sampling, stop_ids=stops,
                        vocab_size=self.model_cfg.vocab_size, use_cache=self.use_cache)


def _chat_loop(gen: Generator, system: str) -> None:
    """Read user turns on stdin (every rank reads rank 0's line), print the assistant's."""
    from megatron_qwen.tokenizer.chatml import render_chatml_prompt

    messages: List[dict] = []
    while True:
        line = [None]
        if _is_rank0():
            try:
                line[0] = input("user> ")
            except EOFError:
                line[0] = "/exit"
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(line, src=0)
        text = (line[0] or "").strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = []
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        ids = render_chatml_prompt(messages, gen.tokenizer, system=system)
        (reply,) = gen.complete([ids], chat=True)
        answer = gen.tokenizer.decode(reply)
        messages.append({"role": "assistant", "content": answer})
        if _is_rank0():
            print(f"assistant> {answer}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    from megatron_qwen.config import load_config
    from megatron_qwen.inference.loading import inactive_notice, load_model, requested_dtype
    from megatron_qwen.tokenizer import load_tokenizer

    cfg = load_config(GenerateConfig, argv, GenerateConfig.__doc__)
    args = cfg.generate
    try:
        cfg.sampling.validate()
        records = read_prompt_records(args.input) if args.input else []
        overrides = {"attention_backend": args.attention_backend} if args.attention_backend else {}
        if args.train_seq_length:
            overrides["seq_length"] = args.train_seq_length
        model, model_cfg = load_model(args.load, cfg.parallel,
                                      requested_dtype(args.bf16, args.dtype), **overrides)
        if len(model) != 1:
            raise ConfigError("generation runs with pipeline_model_parallel_size=1")
        set_long_context(model, LongContext(args.use_dynamic_ntk, args.use_logn_attn, args.window_rule))
        tokenizer = load_tokenizer(args.tokenizer)
    except (ConfigError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    gen = Generator(model[0], model_cfg, tokenizer, cfg.sampling, args.use_kv_cache)
    if args.prompt is not None:
        records = [{"prompt": args.prompt}]
    prompt_ids = [gen.ids_of(r, args.chat_format, args.system) for r in records]
    longest = max(map(len, prompt_ids)) + cfg.sampling.max_new_tokens if prompt_ids else None
    notice = inactive_notice(model_cfg.seq_length, longest, args.use_dynamic_ntk, args.use_logn_attn)
    if notice and _is_rank0():
        print(notice, file=sys.stderr, flush=True)
    if args.chat:
        _chat_loop(gen, args.system)
        return []
    results = []
    started, new_tokens = time.perf_counter(), 0
    for i in range(0, len(records), args.micro_batch_size):
        batch = records[i:i + args.micro_batch_size]
        chat_flags = [args.chat_format or not isinstance(r.get("prompt"), str) for r in batch]
        ids = prompt_ids[i:i + args.micro_batch_size]
        # a batch mixes chat and plain prompts only if the file does; stop at both ends then
        outputs = gen.complete(ids, chat=any(chat_flags))
        for record, out in zip(batch, outputs):
            new_tokens += len(out)
            results.append({**record, "response": tokenizer.decode(out), "response_tokens": len(out)})
    seconds = time.perf_counter() - started
    if _is_rank0():
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        if args.output:
            out = Path(args.output)
            tmp = out.with_suffix(out.suffix + ".tmp")
            tmp.write_text(lines, encoding="utf-8")
            tmp.replace(out)
        elif args.prompt is not None:
            print(results[0]["response"], flush=True)
        else:
            sys.stdout.write(lines)
        print(f"generated {new_tokens} tokens for {len(results)} prompt(s) in {seconds:.1f} s "
              f"({new_tokens / max(seconds, 1e-9):.1f} tokens/s, "
              f"kv cache {'on' if args.use_kv_cache else 'off'})", file=sys.stderr, flush=True)
    return results
