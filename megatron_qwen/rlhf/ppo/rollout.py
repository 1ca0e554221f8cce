"""Sampling responses from the actor: KV-cached, batched, in micro-batches, safe under ZeRO-3.

Why our own loop rather than ``generate``: (1) under ZeRO-3 with partitioned parameters every
forward is a collective (each layer's parameters are gathered from all ranks), so a rank whose
responses have all ended must keep stepping until every rank is done; we all-reduce a "still
running" flag each step and feed finished rows a pad token. With the parameters gathered for the
whole rollout (``generator.InProcessGenerator``) forwards are local and each micro-batch stops on
its own. (2) Each sequence draws its uniforms from its own ``torch.Generator`` seeded by (seed,
step, global sample index), so the samples do not depend on how the batch is split over ranks or
micro-batches or on what else is in the batch: one process and N processes roll out the same
responses, and a resumed run rolls out what the uninterrupted run would have. The uniforms are
drawn up front (one per row and token) and each step samples all rows at once by inverse CDF, so
the per-row streams cost no per-token Python loop.

Only the last position's logits are computed, in the prefill too. Both samples of a prompt are
generated in the same micro-batch when it holds them, so the prompt forward is shared work.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_qwen.rlhf.heads import position_ids_from_mask
from megatron_qwen.runtime.collectives import all_reduce_scalars


@dataclasses.dataclass
class Rollout:
    """One rank's batch of prompt + response sequences (left-padded prompts, right-padded responses)."""

    sequences: torch.Tensor  # [b, P + R] token ids
    attention_mask: torch.Tensor  # [b, P + R] 1 on real prompt and response tokens
    prompt_length: int  # P: responses start at this column
    response_mask: torch.Tensor  # [b, R] float, 1 on response tokens (through the stop token)
    finished: torch.Tensor  # [b] bool: the response ended with the stop token
    prompt_index: torch.Tensor  # [b] global prompt index (for logging/grouping)
    # [b, R] the generator's log p(token) (temperature 1, no top-p), 0 off the response; None if
    # the generator gave none. PPO recomputes its own; a gap between them is an engine mismatch.
    logprobs: torch.Tensor | None = None

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1).long()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling);
    the others get -inf. The most likely token is always kept."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token if the mass *before* it already reaches top_p
    drop = (probs.cumsum(-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: the first index whose cumulative probability reaches ``u * total``.

    ``uniforms`` lie in (0, 1]; a token with probability 0 (cut by top-p) has an empty interval
    and is never chosen."""
    cdf = probs.double().cumsum(-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp(max=probs.shape[-1] - 1)


def _any_rank(flag: bool, device: torch.device) -> bool:
    return bool(all_reduce_scalars([1.0 if flag else 0.0], device=device, op="max")[0])


def forward_is_collective(model: torch.nn.Module) -> bool:
    """True when a forward of ``model`` all-gathers ZeRO-3 partitions (some parameter is not
    available locally): then every rank must run the same number of forwards."""
    statuses = [p.ds_status for p in model.parameters() if hasattr(p, "ds_status")]
    if not statuses:
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return any(s == ZeroParamStatus.NOT_AVAILABLE for s in statuses)


def row_uniforms(seeds: list[int], max_new_tokens: int) -> torch.Tensor:
    """[rows, max_new_tokens] uniforms in (0, 1], each row from its own seeded generator."""
    return torch.stack([
        1.0 - torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
        for s in seeds])


def _sample_batch(model, prompts, uniforms, *, max_new_tokens, stop_token_id, pad_token_id, top_p,
                  temperature, device, synced) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One generation micro-batch: (tokens [m, steps], their log-probs [m, steps], finished [m]).

    Only the last position's logits are computed (``logits_to_keep=1``): the prefill would
    otherwise materialise [m, prompt, vocab] logits to read one row of them."""
    ids, mask = left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    b = ids.shape[0]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1, :]
    next_pos = mask.sum(1)  # position id of the first response token
    tokens = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    full_mask = mask
    steps = 0
    for t in range(max_new_tokens):
        probs = torch.softmax(top_p_filter(logits.float() / temperature, top_p), dim=-1)
        new = sample_inverse_cdf(probs, uniforms[:, t])
        new = torch.where(done, torch.full_like(new, pad_token_id), new)
        tokens[:, t] = new
        live = ~done  # rows that produced a real token at step t
        # the actor's own log-prob of the token (temperature 1, no top-p): what PPO scores with
        step_logp = torch.log_softmax(logits.float(), dim=-1).gather(1, new.unsqueeze(1)).squeeze(1)
        logprobs[:, t] = torch.where(live, step_logp, torch.zeros_like(step_logp))
        finished |= live & (new == stop_token_id)
        done |= new == stop_token_id
        steps = t + 1
        running = not bool(done.all())
        if t + 1 == max_new_tokens or not (_any_rank(running, device) if synced else running):
            break
        full_mask = torch.cat([full_mask, live.long().unsqueeze(1)], dim=1)
        out = model(input_ids=new.unsqueeze(1), attention_mask=full_mask,
                    position_ids=(next_pos + t).unsqueeze(1), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
    return tokens[:, :steps], logprobs[:, :steps], finished


def _right_pad_to(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    seeds: list[int],
    *,
    max_new_tokens: int,
    stop_token_id: int,
    pad_token_id: int,
    top_p: float = 0.9,
    temperature: float = 1.0,
    prompt_index: list[int] | None = None,
    device: torch.device | None = None,
    micro_batch_size: int | None = None,
) -> Rollout:
    """Sample one response per prompt row (repeat a prompt to get several samples).

    ``model`` is a transformers causal LM (``engine.module`` for a DeepSpeed engine, or the
    module with its ZeRO-3 parameters gathered: ``rlhf/ppo/generator.py``). Every rank must call
    this in the same step. ``micro_batch_size`` rows are generated at a time (None: all): the
    samples do not change with it, only the KV cache's size. When a forward is a collective
    (partitioned ZeRO-3 parameters) the ranks step together until all are done; otherwise each
    micro-batch stops on its own (collective forwards need the same number of rows on every
    rank, which PPO's even deal gives). Either way the responses are padded to the width of the
    longest one over all ranks, so every rank's rollout has the same shape.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"generate: micro_batch_size={micro_batch_size} must be >= 1")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    synced = forward_is_collective(model)
    uniforms = row_uniforms(seeds, max_new_tokens).to(device)
    step = micro_batch_size or len(prompts)
    parts = [_sample_batch(model, prompts[s:s + step], uniforms[s:s + step], max_new_tokens=max_new_tokens,
                           stop_token_id=stop_token_id, pad_token_id=pad_token_id, top_p=top_p,
                           temperature=temperature, device=device, synced=synced)
             for s in range(0, len(prompts), step)]
    if was_training:
        model.train()
    width = int(all_reduce_scalars([max(p[0].shape[1] for p in parts)], device=device, op="max")[0])
    tokens = torch.cat([_right_pad_to(p[0], width, pad_token_id) for p in parts])
    logprobs = torch.cat([_right_pad_to(p[1], width, 0.0) for p in parts])
    finished = torch.cat([p[2] for p in parts])
    ids, mask = left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    # response mask: every token up to and including the stop token (all of them if it never came)
    is_stop = (tokens == stop_token_id).long()
    before_stop = (is_stop.cumsum(1) - is_stop) == 0
    response_mask = before_stop.float()
    return Rollout(
        sequences=torch.cat([ids, tokens], dim=1), attention_mask=torch.cat([mask, response_mask.long()], dim=1),
        prompt_length=ids.shape[1], response_mask=response_mask, finished=finished,
        prompt_index=torch.tensor(prompt_index if prompt_index is not None else list(range(len(prompts)))),
        logprobs=logprobs * response_mask,
    )
