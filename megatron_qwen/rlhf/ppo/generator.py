"""The one seam between PPO and whatever samples its responses.

PPO hands a :class:`GenerationRequest` (token-id prompts, one seed per row, the sampling
settings) to a :class:`RolloutGenerator` and gets back a :class:`~rollout.Rollout` (token ids,
masks, the generator's log-probs). After every actor update it calls ``push_weights(actor)`` so
the generator samples from the current policy. Nothing else of PPO touches the generator, so an
external engine (vLLM, SGLang) is one more subclass: send the prompts and seeds, build the
rollout from the token lists it returns with :func:`rollout_from_token_lists`, and copy the
actor's weights into it in ``push_weights`` (:func:`full_weights` yields them one tensor at a
time, gathered under ZeRO-3). No external engine ships here; none has been run.

:class:`InProcessGenerator` samples with the actor's own DeepSpeed module. Under ZeRO-3 it
gathers the actor's parameters once per rollout and turns ZeRO's per-module hooks off while it
generates (``deepspeed.runtime.zero.unwrap_model_for_generation``): no all-gather per token, at
the cost of one full copy of the actor's weights per rank for the length of the rollout
(``rollout.generation_gather_params``; off = today's gather per forward, the partitioned memory).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Iterator, Optional

import torch

from megatron_qwen.rlhf.ppo.rollout import Rollout, generate, left_pad


@dataclasses.dataclass
class GenerationRequest:
    """One rank's rows: prompt i is sampled with ``seeds[i]`` (one response per row)."""

    prompts: list[list[int]]
    seeds: list[int]
    prompt_index: list[int]  # global prompt index of each row (logging/grouping)
    max_new_tokens: int
    stop_token_id: int
    pad_token_id: int
    top_p: float = 1.0
    temperature: float = 1.0


class RolloutGenerator(abc.ABC):
    """Prompts + seeds in, token ids + log-probs out, weights pushed in.

    ``generate`` is called by every rank in the same PPO step with its own rows and must return
    responses of the same width on every rank (pad on the right)."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> Rollout:
        ...

    @abc.abstractmethod
    def push_weights(self, actor) -> None:
        """Called by every rank after the actor's optimizer steps, before the next rollout."""


@contextlib.contextmanager
def generation_module(engine, gather_params: bool = True) -> Iterator[torch.nn.Module]:
    """The engine's module ready to generate; under ZeRO-3 with ``gather_params`` its parameters
    are gathered for the whole ``with`` block and forwards are local (no collectives)."""
    partitioned = getattr(engine, "zero_optimization_partition_weights", lambda: False)()
    if not (gather_params and partitioned):
        yield engine.module
        return
    from deepspeed.runtime.zero import unwrap_model_for_generation

    with unwrap_model_for_generation(engine) as unwrapped:
        yield unwrapped.module


class InProcessGenerator(RolloutGenerator):
    """Samples with the actor engine itself (:func:`rollout.generate`); shares its parameters,
    so pushing weights is a no-op."""

    def __init__(self, actor, micro_batch_size: Optional[int] = None, gather_params: bool = True):
        self.actor = actor
        self.micro_batch_size = micro_batch_size
        self.gather_params = gather_params

    def generate(self, request: GenerationRequest) -> Rollout:
        r = request
        with generation_module(self.actor, self.gather_params) as model:
            return generate(model, r.prompts, r.seeds, max_new_tokens=r.max_new_tokens,
                            stop_token_id=r.stop_token_id, pad_token_id=r.pad_token_id, top_p=r.top_p,
                            temperature=r.temperature, prompt_index=r.prompt_index,
                            device=self.actor.device, micro_batch_size=self.micro_batch_size)

    def push_weights(self, actor) -> None:
        if actor is not self.actor:
            raise ValueError("InProcessGenerator samples with the actor it was built with")


def rollout_from_token_lists(request: GenerationRequest, responses: list[list[int]],
                             logprobs: Optional[list[list[float]]] = None,
                             width: Optional[int] = None) -> Rollout:
    """A :class:`Rollout` from per-row response token ids (what an external engine returns).

    A response ends at its first stop token (kept) or after ``max_new_tokens``; ``width`` pads
    the responses to a common width across ranks (default: this rank's longest)."""
    if len(responses) != len(request.prompts):
        raise ValueError(f"{len(responses)} responses for {len(request.prompts)} prompts")
    cut = []
    for row in responses:
        row = list(row[:request.max_new_tokens])
        if request.stop_token_id in row:
            row = row[:row.index(request.stop_token_id) + 1]
        cut.append(row)
    width = width if width is not None else max(1, max(map(len, cut)))
    b = len(cut)
    tokens = torch.full((b, width), request.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((b, width))
    logp = torch.zeros((b, width))
    for i, row in enumerate(cut):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        response_mask[i, :len(row)] = 1.0
        if logprobs is not None:
            logp[i, :len(row)] = torch.tensor(list(logprobs[i][:len(row)]), dtype=torch.float32)
    ids, mask = left_pad(request.prompts, request.pad_token_id)
    finished = torch.tensor([bool(row) and row[-1] == request.stop_token_id for row in cut])
    return Rollout(sequences=torch.cat([ids, tokens], 1),
                   attention_mask=torch.cat([mask, response_mask.long()], 1), prompt_length=ids.shape[1],
                   response_mask=response_mask, finished=finished,
                   prompt_index=torch.tensor(request.prompt_index),
                   logprobs=logp if logprobs is not None else None)


def full_weights(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every actor parameter, one at a time; under ZeRO-3 each is gathered
    on every rank for the moment it is yielded (all ranks must iterate together)."""
    partitioned = getattr(engine, "zero_optimization_partition_weights", lambda: False)()
    module = getattr(engine, "module", engine)
    for name, param in module.named_parameters():
        if partitioned:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.detach().clone()
        else:
            yield name, param.detach()
