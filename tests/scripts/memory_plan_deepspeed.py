"""Measured vs planned peak of reward-model training steps on DeepSpeed ZeRO 0-3 (torchrun, gloo).

The trainer's own pieces (``load_with_head``, ``ds_config_from_group``, ``init_train_engine``,
``pair_rewards``, ``pairwise_loss``, ``zero3_construction``) on a random Qwen2 written to
OUT/<model>; the loaded model's tensors (under ZeRO-3 each rank's partitions, as the trainer builds
it), then engine construction and two optimizer steps inside PeakAllocations; one JSON line per
case from rank 0 (the largest rank's peak)."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

MODELS = {  # Qwen2Config fields
    "tiny": dict(vocab_size=151936, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),  # the real vocabulary
    "small": dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
}


def write_model(out: Path, name: str) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = out / name
    if torch.distributed.get_rank() == 0 and not (path / "config.json").is_file():
        torch.manual_seed(0)
        cfg = Qwen2Config(max_position_embeddings=512, tie_word_embeddings=False, **MODELS[name])
        Qwen2ForCausalLM(cfg).save_pretrained(str(path))
    torch.distributed.barrier()
    return path


def measure(out: Path, model: str, zero_stage: int, micro: int, seq: int, checkpointing: bool) -> dict:
    from megatron_qwen.config import build_config
    from megatron_qwen.memory_plan.deepspeed_plan import plan_reward_model
    from megatron_qwen.memory_plan.measure import PeakAllocations, tensor_bytes, track_cpu_allocations
    from megatron_qwen.rlhf import hf_model
    from megatron_qwen.rlhf.deepspeed_config import (ds_config_from_group, init_train_engine,
                                                     zero3_construction)
    from megatron_qwen.rlhf.reward_config import RewardModelConfig
    from megatron_qwen.rlhf.reward_trainer import pair_rewards, pairwise_loss

    path = write_model(out, model)
    world = torch.distributed.get_world_size()
    cfg = build_config(RewardModelConfig, {
        "model": {"model_path": str(path)}, "data": {"train_data_path": "unused", "seq_length": seq},
        "optim": {"micro_batch_size": micro, "global_batch_size": micro * world},
        "deepspeed": {"zero_stage": zero_stage, "gradient_checkpointing": checkpointing},
        "checkpoint": {"export_dir": "unused"}})
    plan = plan_reward_model(cfg, world, on_gpu=torch.cuda.is_available())  # GPU: the GPU check's line
    g = torch.Generator().manual_seed(0)
    gc.collect()
    track_cpu_allocations()  # the block may free loaded tensors: count those frees
    ds = ds_config_from_group(cfg.deepspeed, micro_batch_size=micro, global_batch_size=micro * world,
                              world_size=world)
    with zero3_construction(ds):  # outside the block: transformers loads on a thread pool
        net = hf_model.load_with_head(path)
    if checkpointing:
        net.gradient_checkpointing_enable()
    base = tensor_bytes(list(net.parameters()) + list(net.buffers()))
    gc.disable()  # no collection of an earlier case's garbage inside this measurement
    with PeakAllocations() as m:
        engine = init_train_engine(net, ds, lr=1e-4)
        engine.train()  # as the trainer does: transformers' checkpointing acts in training mode only
        for _ in range(2):
            ids = torch.randint(0, MODELS[model]["vocab_size"], (2 * micro, seq), generator=g)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "end_index": torch.full((2 * micro,), seq - 1)}
            loss = pairwise_loss(*pair_rewards(engine, batch))
            engine.backward(loss)
            engine.step()
        engine.destroy()
    gc.enable()
    peaks = [None] * world
    torch.distributed.all_gather_object(peaks, base + m.peak)
    del engine, net, loss
    gc.collect()
    return {"model": model, "zero_stage": zero_stage, "micro": micro, "seq": seq,
            "checkpointing": checkpointing, "measured": max(peaks), "planned": plan.peak,
            "bucket": sum(c.bytes for c in plan.components
                          if c.name.endswith("gradient bucket") and c.phase is None),
            "table": plan.table()}


def main() -> None:
    from megatron_qwen.rlhf.deepspeed_config import init_distributed

    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    init_distributed()
    for case in cases:
        result = measure(out, **case)
        if torch.distributed.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
