"""Measured vs planned peak of megatron-core training steps (run under torchrun, gloo).

For each layout: build the Trainer (model, DDP, optimizer) and run two steps on random tokens
inside PeakAllocations; print one JSON line per layout from the rank with the largest peak."""

from __future__ import annotations

import gc
import json
import sys

import torch

from megatron_qwen.config import build_config
from megatron_qwen.memory_plan.measure import PeakAllocations
from megatron_qwen.memory_plan.megatron_plan import plan_pretrain
from megatron_qwen.runtime import destroy, init_distributed
from megatron_qwen.training.config import PretrainConfig
from megatron_qwen.training.loop import Trainer

MODELS = {  # name: model group
    "tiny": {"preset": "tiny", "seq_length": 128},  # the real vocabulary: logits dominate
    "small": {"preset": "tiny_vocab", "num_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
              "num_query_groups": 4, "ffn_hidden_size": 704, "seq_length": 256},
}


def batches(cfg, n: int):
    g = torch.Generator().manual_seed(0)
    b, s, v = cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size
    for _ in range(n):
        tokens = torch.randint(0, v, (b, s), generator=g)
        yield {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(b, s),
               "position_ids": torch.arange(s).expand(b, s).contiguous()}


def measure(model: str, parallel: dict, train: dict) -> dict:
    recipe = {"model": MODELS[model], "parallel": parallel, "train": {"train_iters": 2, **train},
              "data": {"data_path": ["unused"]}, "optim": {"lr": 1e-3, "min_lr": 0.0}}
    cfg = build_config(PretrainConfig, recipe)
    init_distributed(cfg.parallel, seed=1)
    world = torch.distributed.get_world_size()
    plan = plan_pretrain(cfg, world, on_gpu=torch.cuda.is_available())  # GPU: the GPU check's line
    gc.collect()  # the previous layout's trainer must not be freed inside this measurement
    gc.disable()  # no collection of an earlier case's garbage inside this measurement
    with PeakAllocations() as m:
        trainer = Trainer(cfg)
        data = batches(cfg, 2 * trainer.num_micro)
        for _ in range(2):
            trainer.train_step(data)
    gc.enable()
    peaks = [None] * world
    torch.distributed.all_gather_object(peaks, m.peak)
    from megatron.core.utils import get_model_config

    get_model_config(trainer.model[0]).grad_scale_func = None  # it holds the optimizer
    del trainer, data
    return {"model": model, "parallel": parallel, "train": train, "measured": max(peaks),
            "planned": plan.peak, "table": plan.table()}


def main() -> None:
    cases = json.loads(sys.argv[1])
    for case in cases:
        out = measure(**case)
        if torch.distributed.get_rank() == 0:
            print("RESULT " + json.dumps(out), flush=True)
    destroy()


if __name__ == "__main__":
    main()
