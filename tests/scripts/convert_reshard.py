"""Worker for tests/test_convert.py, run under torchrun with 2 gloo processes.

    convert_reshard.py WORKDIR CKPT:LAYOUT [CKPT:LAYOUT ...]

WORKDIR holds ``hf/`` (the random transformers Qwen2ForCausalLM every checkpoint came from) and
the converted megatron-core checkpoints. For each CKPT:LAYOUT (layout: tp1, tp2, pp2) it builds our
model with the model builder at that layout from the checkpoint's own config, loads the weights
through dist checkpointing (``load_model_weights``) and checks its logits (forward through the
pipeline schedule, gathered over TP) against Qwen2ForCausalLM's, max abs diff <= 1e-4. Then:
  * the checkpoint's keys equal the keys our model's sharded state dict asks for;
  * a checkpoint padded for another vocabulary size is refused with a one-line error;
  * greedy decoding (argmax, full recompute) of GREEDY_TOKENS tokens; rank 0 writes the ids to
    WORKDIR/greedy.json for the test to compare with transformers' generate on the export.
Prints "OK ..." lines.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from megatron_qwen.checkpoint.mapping import CheckpointError
from megatron_qwen.checkpoint.mcore_io import (McoreCheckpointReader, load_model_weights,
                                               resolve_checkpoint_dir)
from megatron_qwen.config import ParallelConfig
from megatron_qwen.model import build_model
from megatron_qwen.runtime import destroy, init_distributed, mcore_version

LAYOUTS = {"tp1": {}, "tp2": {"tensor_model_parallel_size": 2},
           "pp2": {"pipeline_model_parallel_size": 2}}
PROMPT = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 0]]
GREEDY_TOKENS = 8


def gather_tp(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    size = ps.get_tensor_model_parallel_world_size()
    if size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(size)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def forward_logits(chunks, tokens: torch.Tensor):
    """Full-vocabulary logits on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, model):
        toks = next(data_iterator)
        out = model(toks, torch.arange(toks.size(1)).expand_as(toks), None)
        return out, lambda logits: (logits.sum() * 0, {"logits": logits.detach()})

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=[iter([tokens]) for _ in chunks], model=chunks,
            num_microbatches=1, seq_length=tokens.size(1), micro_batch_size=tokens.size(0),
            forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return gather_tp(out[0]["logits"])


def build(ckpt: str, layout: str):
    model_cfg = McoreCheckpointReader(ckpt).cfg  # the checkpoint's own config (its padding too)
    parallel_cfg = ParallelConfig(**LAYOUTS[layout])
    init_distributed(parallel_cfg, seed=1)
    chunks = build_model(model_cfg, parallel_cfg)
    for c in chunks:
        c.eval()
    return model_cfg, chunks


def check_keys(ckpt: str, chunks) -> None:
    """The checkpoint holds exactly the tensors and objects our model's sharded state dict names."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    wanted = {}
    for chunk in chunks:
        for sh in chunk.sharded_state_dict().values():
            if isinstance(sh, ShardedTensorFactory):
                wanted[sh.key] = None
            elif isinstance(sh, ShardedBase):
                wanted[sh.key] = tuple(sh.global_shape)
    gathered = [None] * torch.distributed.get_world_size()  # pipeline stages hold different keys
    torch.distributed.all_gather_object(gathered, wanted)
    for part in gathered:
        wanted.update(part)
    saved = load_sharded_metadata(str(resolve_checkpoint_dir(ckpt)))
    saved_keys = {k.split("/shard_")[0] for k in saved} - mcore_version.FORMAT_KEYS
    assert saved_keys == set(wanted), f"keys differ: {sorted(saved_keys ^ set(wanted))}"
    for key, shape in wanted.items():
        if shape is not None and key in saved and hasattr(saved[key], "global_shape"):
            assert tuple(saved[key].global_shape) == shape, (key, saved[key].global_shape, shape)
    print(f"OK keys {os.path.basename(ckpt)}: {len(wanted)} keys match the model", flush=True)


def main() -> None:
    from transformers import AutoModelForCausalLM

    workdir, specs = sys.argv[1], sys.argv[2:]
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "hf"), dtype=torch.float32).eval()
    rows = hf.config.vocab_size
    tokens = torch.tensor(PROMPT)
    with torch.no_grad():
        ref = hf(tokens).logits
    first = True
    for spec in specs:
        name, layout = spec.split(":")
        ckpt = os.path.join(workdir, name)
        model_cfg, chunks = build(ckpt, layout)
        load_model_weights(chunks, ckpt)
        logits = forward_logits(chunks, tokens)
        if logits is not None:
            assert logits.shape[-1] == model_cfg.padded_vocab_size, logits.shape
            diff = (logits[..., :rows] - ref).abs().max().item()
            assert diff <= 1e-4, f"{spec}: logits differ from Qwen2ForCausalLM by {diff}"
            print(f"OK logits {spec} padded_vocab={model_cfg.padded_vocab_size} diff={diff:.2e}",
                  flush=True)
        if first:
            first = False
            check_keys(ckpt, chunks)
    # A checkpoint padded for another vocabulary size: one clear line, no traceback soup.
    name, layout = specs[0].split(":")
    model_cfg, chunks = build(os.path.join(workdir, name), "tp1")
    other = next(s.split(":")[0] for s in specs
                 if McoreCheckpointReader(os.path.join(workdir, s.split(":")[0])).cfg.padded_vocab_size
                 != model_cfg.padded_vocab_size)
    try:
        load_model_weights(chunks, os.path.join(workdir, other))
        raise AssertionError("a checkpoint with another vocabulary padding loaded")
    except CheckpointError as exc:
        msg = str(exc)
        assert "\n" not in msg and "embedding.word_embeddings.weight" in msg and "reshard" in msg, msg
        print(f"OK padding mismatch refused: {msg}", flush=True)
    # Greedy decoding at TP=1 (both ranks are data-parallel replicas) from the last checkpoint.
    name, _ = specs[-1].split(":")
    model_cfg, chunks = build(os.path.join(workdir, name), "tp1")
    load_model_weights(chunks, os.path.join(workdir, name))
    seq = tokens.clone()
    for _ in range(GREEDY_TOKENS):
        logits = forward_logits(chunks, seq)
        nxt = logits[:, -1, :rows].argmax(-1, keepdim=True)  # padding rows are not tokens
        seq = torch.cat([seq, nxt], dim=1)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(workdir, "greedy.json"), "w") as f:
            json.dump(seq[:, tokens.size(1):].tolist(), f)
    print(f"OK greedy {name}", flush=True)
    destroy()


if __name__ == "__main__":
    main()
