"""Autoregressive generation from the megatron-core Qwen model, with or without a KV cache.

The cache is megatron-core's own ``StaticInferenceContext`` (it stores un-rotated keys per layer
and works through our core-attention backends on CPU and GPU). A batch of prompts of different
lengths is run as Megatron does: the shared prefix (the shortest prompt) is prefilled at once,
then every step feeds one position for all rows, taking the prompt's own token while a row is
still inside its prompt and the sampled one after. No padding ever enters the attention, so
positions (and RoPE) are exact for every row.

Sampling: greedy (``temperature=0``), temperature, top-k, top-p, and the CTRL/HF repetition
penalty (logits of tokens already in the row divided by it if positive, multiplied if negative).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch


@dataclasses.dataclass
class SamplingParams:
    """How the next token is chosen (temperature 0 = greedy)."""

    max_new_tokens: int = 128  # most tokens generated per prompt
    temperature: float = 0.0  # softmax temperature (0: greedy)
    top_k: int = 0  # sample from the k most likely tokens (0: no top-k cut)
    top_p: float = 1.0  # sample from the smallest set reaching this probability (1.0: no nucleus cut)
    repetition_penalty: float = 1.0  # divide logits of tokens already present by this (1.0: none)
    seed: int = 1234  # sampling seed

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0")


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [b, v]; context [b, s] token ids already in each row."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set of tokens whose
    probability reaches top_p (the most likely token always stays)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_next(logits: torch.Tensor, context: torch.Tensor, params: SamplingParams,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """The next token of each row from its last-position logits [b, v] (float32)."""
    logits = apply_repetition_penalty(logits.float(), context, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _broadcast_from_tp_source(tokens: torch.Tensor) -> torch.Tensor:
    """Every TP rank must feed the same tokens: rank 0 of the TP group decides."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(tokens, ps.get_tensor_model_parallel_src_rank(),
                                    group=ps.get_tensor_model_parallel_group())
    return tokens


def _check_layout(model) -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("generation runs with pipeline_model_parallel_size=1 (use TP to split a "
                         "model; eval_ppl.py supports PP)")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop_ids: Sequence[int] = (),
    vocab_size: Optional[int] = None,
    use_cache: bool = True,
    device: Optional[torch.device] = None,
) -> List[List[int]]:
    """The new tokens of each prompt (a stop token ends a row and is not returned).

    ``vocab_size`` masks the padded embedding rows so they are never chosen.
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    params.validate()
    _check_layout(model)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    device = device or next(model.parameters()).device
    model.eval()
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    batch, start = len(prompts), int(lengths.min())
    total = int(lengths.max()) + params.max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    positions = torch.arange(total, device=device).expand(batch, total)
    stops = torch.tensor(list(stop_ids) or [-1], device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    ended_at = torch.full((batch,), total, device=device)  # index of the first stop token
    generator = torch.Generator().manual_seed(params.seed)
    context = StaticInferenceContext(batch, total) if use_cache else None

    def last_logits(begin: int, end: int) -> torch.Tensor:
        kw = {}
        if context is not None:
            context.sequence_len_offset = begin
            if begin > 0:
                context.enable_decode_mode()
            kw["inference_context"] = context
        else:
            begin = 0
        out = model(tokens[:, begin:end], positions[:, begin:end], None,
                    runtime_gather_output=True, **kw)
        logits = out[:, -1].float()
        if vocab_size is not None and vocab_size < logits.size(-1):
            logits[:, vocab_size:] = float("-inf")
        return logits

    logits = last_logits(0, start)
    for cur in range(start, total):
        in_prompt = cur < lengths
        sampled = choose_next(logits, tokens[:, :cur], params, generator)
        sampled = _broadcast_from_tp_source(sampled)
        nxt = torch.where(in_prompt | done, tokens[:, cur], sampled)
        tokens[:, cur] = nxt
        newly = ~in_prompt & ~done & torch.isin(nxt, stops)
        ended_at = torch.where(newly, torch.full_like(ended_at, cur), ended_at)
        done |= newly | (~in_prompt & (cur + 1 - lengths >= params.max_new_tokens))
        if bool(done.all()) or cur + 1 == total:
            break
        logits = last_logits(cur, cur + 1)
    return [tokens[i, lengths[i]: min(int(ended_at[i]), int(lengths[i]) + params.max_new_tokens)].tolist()
            for i in range(batch)]
