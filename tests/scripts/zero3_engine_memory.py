"""2-process check (torchrun, gloo): ZeRO-3 engines hold about 1/world of the model per rank.

A small causal LM is built partitioned (``zero3_construction``), then wrapped in a training engine
(the actor's / reward model's ``init_train_engine``) and an inference engine (the reference's
``init_inference_engine``), each inside ``PeakAllocations``. Every tensor DeepSpeed allocates per
rank while building them must be at most one rank's partition plus the largest parameter: no
whole-model buffer (DeepSpeed's default reduce bucket, 5e8 elements, is one: 2 GB fp32 allocated
whole, filled with whole gradients in backward), and the inference engine holds no optimizer
state. Building under zero.Init leaves ``torch.nn.functional.linear`` as it was.

usage: zero3_engine_memory.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import ppo_tiny  # noqa: E402

from megatron_qwen.memory_plan.measure import PeakAllocations  # noqa: E402
from megatron_qwen.rlhf import hf_model  # noqa: E402
from megatron_qwen.rlhf.deepspeed_config import (init_distributed, init_inference_engine,  # noqa: E402
                                                 init_train_engine, make_ds_config, zero3_construction)

PLAIN_LINEAR = torch.nn.functional.linear  # before any zero.Init
MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def main() -> None:
    out = Path(sys.argv[1])
    init_distributed()
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        ppo_tiny.make_actor(out / "model", **MODEL)
    dist.barrier()
    for train in (True, False):
        ds = make_ds_config(micro_batch_size=1, global_batch_size=world, world_size=world, zero_stage=3,
                            train=train)
        with zero3_construction(ds):
            model = hf_model.load_causal_lm(out / "model")
        # zero.Init leaves torch's linear alone (memory_efficient_linear off): no process-wide swap
        assert torch.nn.functional.linear is PLAIN_LINEAR, torch.nn.functional.linear
        params = list(model.parameters())
        full = sum(p.ds_numel for p in params)
        local = sum(p.ds_tensor.numel() for p in params)
        # partitions are padded up to whole elements: at most world - 1 extra per parameter
        assert full / world <= local <= full / world + len(params) * (world - 1), (rank, local, full)
        with PeakAllocations() as m:
            if train:
                engine = init_train_engine(model, ds, lr=1e-3)
            else:
                engine = init_inference_engine(model, ds)
        bound = (local + max(p.ds_numel for p in params)) * 4  # fp32 bytes
        what = "training" if train else "inference"
        assert m.largest <= bound, (f"rank {rank}: {what} engine allocated a {m.largest / 2**20:.2f} MiB "
                                    f"tensor; one partition + the largest parameter is "
                                    f"{bound / 2**20:.2f} MiB (the whole model: {full * 4 / 2**20:.2f} MiB)")
        if train:
            # fp32 master, two Adam moments, the gradient partition, the optimizer-init gradient
            # buffer and the reduce bucket: each at most one bound
            assert m.peak <= 6 * bound, (rank, m.peak, bound)
        else:
            from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

            assert isinstance(engine.optimizer, DeepSpeedZeRoOffload), type(engine.optimizer)
            assert m.peak <= bound, (rank, m.peak, bound)  # no master copy, no optimizer state
        print(f"rank {rank}: ZeRO-3 {what} engine: largest allocation {m.largest} B, peak {m.peak} B, "
              f"bound {bound} B, whole model {full * 4} B", flush=True)
        engine.destroy()


if __name__ == "__main__":
    main()
