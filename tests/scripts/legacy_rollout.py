"""Today's sampler before the ZeRO-3 rollout rework (commit 4d0f3e7), frozen for comparison.

The tests check that the new rollout path samples exactly these token ids from the same seeds;
bench/ppo_step.py times it against the new path. One forward per token on the module as given
(under ZeRO-3 every one all-gathers the whole model), all rows in one batch, full-prompt logits.
Not used by the package.
"""

from __future__ import annotations

import torch

from megatron_qwen.rlhf.heads import position_ids_from_mask
# the sampling steps and the per-row uniforms below are the old code, kept as they were; the
# cross-rank stop vote is plumbing, shared with the new path
from megatron_qwen.rlhf.ppo.rollout import Rollout, _any_rank, left_pad, sample_inverse_cdf, top_p_filter


@torch.no_grad()
def legacy_generate(
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
) -> Rollout:
    """Sample one response per prompt row (repeat a prompt to get several samples).

    ``model`` is a transformers causal LM (``engine.module`` for a DeepSpeed engine). Every rank
    must call this in the same step; it returns when all ranks' rows have stopped or hit
    ``max_new_tokens``.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, mask = left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    b, prompt_len = ids.shape
    # one uniform in (0, 1] per row and token, from the row's own generator
    uniforms = torch.stack([
        1.0 - torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
        for s in seeds]).to(device)

    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1, :]
    next_pos = mask.sum(1)  # position id of the first response token
    tokens = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    full_mask = mask
    steps = 0
    for t in range(max_new_tokens):
        probs = torch.softmax(top_p_filter(logits.float() / temperature, top_p), dim=-1)
        new = sample_inverse_cdf(probs, uniforms[:, t])
        new = torch.where(done, torch.full_like(new, pad_token_id), new)
        tokens[:, t] = new
        finished |= (~done) & (new == stop_token_id)
        live = ~done  # rows that produced a real token at step t
        done |= new == stop_token_id
        steps = t + 1
        if t + 1 == max_new_tokens or not _any_rank(not bool(done.all()), device):
            break
        full_mask = torch.cat([full_mask, live.long().unsqueeze(1)], dim=1)
        out = model(input_ids=new.unsqueeze(1), attention_mask=full_mask,
                    position_ids=(next_pos + t).unsqueeze(1), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1, :]

    tokens = tokens[:, :steps]
    # response mask: every token up to and including the stop token (all of them if it never came)
    is_stop = (tokens == stop_token_id).long()
    before_stop = (is_stop.cumsum(1) - is_stop) == 0
    response_mask = before_stop.float()
    sequences = torch.cat([ids, tokens], dim=1)
    attention_mask = torch.cat([mask, response_mask.long()], dim=1)
    if was_training:
        model.train()
    return Rollout(
        sequences=sequences, attention_mask=attention_mask, prompt_length=prompt_len,
        response_mask=response_mask, finished=finished,
        prompt_index=torch.tensor(prompt_index if prompt_index is not None else list(range(b))),
    )
