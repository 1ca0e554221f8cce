"""Worker for tests/test_te_layout.py (2 gloo processes, context_parallel_size=2): the pieces of
context parallelism that run without Transformer Engine.

- our RoPE module (dynamic NTK, model/long_context.py) gives each CP rank the table rows
  megatron-core's RotaryEmbedding gives it, and those are the positions
  ``get_batch_on_this_cp_rank`` hands the rank (the trainer's split of every batch);
- the logged loss of a step is the whole sequences' token mean, from the CP ranks' partial sums.

Prints ``CP_UNITS_OK`` on rank 0 when every assertion held."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parents[2]))

import megatron_qwen  # noqa: E402,F401  (megatron-core 0.19's import shims, before megatron.core)
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402

from megatron_qwen.config import ParallelConfig  # noqa: E402
from megatron_qwen.model.long_context import QwenRotaryEmbedding  # noqa: E402
from megatron_qwen.runtime import destroy, init_distributed  # noqa: E402
from megatron_qwen.runtime.mcore_version import batch_on_this_cp_rank  # noqa: E402
from megatron_qwen.training.loop import _mean_loss  # noqa: E402


def main() -> None:
    init_distributed(ParallelConfig(context_parallel_size=2), seed=1)
    assert ps.get_context_parallel_world_size() == 2 and ps.get_data_parallel_world_size() == 1
    rank, seq, dim = ps.get_context_parallel_rank(), 32, 16
    config = SimpleNamespace(use_dynamic_ntk=False, training_seq_length=seq)
    ours = QwenRotaryEmbedding(config, kv_channels=dim, rotary_base=10000.0, use_cpu_initialization=True)
    ref = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    emb = ours(seq)
    assert emb.shape[0] == seq // 2, emb.shape
    assert torch.equal(emb, ref(seq))
    positions = batch_on_this_cp_rank({"position_ids": torch.arange(seq)[None]})["position_ids"][0]
    full = ref.get_emb(seq)
    assert torch.equal(emb, full[positions])
    # two micro-batches; this rank's part of each: (loss sum, token count), counts unequal
    parts = [torch.tensor([[3.0, 2.0], [1.0, 4.0]]), torch.tensor([[5.0, 6.0], [2.0, 1.0]])][rank]
    losses = [{"lm loss": row.clone()} for row in parts]
    per_token = _mean_loss(losses, per_token=True)
    assert abs(per_token - (3 + 1 + 5 + 2) / (2 + 4 + 6 + 1)) < 1e-6, per_token
    per_micro = _mean_loss([{"lm loss": row.clone()} for row in parts], per_token=False)
    assert abs(per_micro - ((3 + 5) / (2 + 6) + (1 + 2) / (4 + 1)) / 2) < 1e-6, per_micro
    destroy()
    if rank == 0:
        print("CP_UNITS_OK", flush=True)


if __name__ == "__main__":
    main()
