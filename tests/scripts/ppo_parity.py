"""2-process PPO checks (run under torchrun, gloo): ZeRO-3 generation with ranks stopping at
different lengths, then a full PPO run under ZeRO-2 and one under ZeRO-3.

usage: ppo_parity.py ASSETS_DIR OUT_DIR NUM_STEPS
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import ppo_tiny  # noqa: E402

from megatron_qwen.config import build_config, parse_overrides  # noqa: E402
from megatron_qwen.rlhf import hf_model  # noqa: E402
from megatron_qwen.rlhf.deepspeed_config import init_distributed, init_inference_engine, make_ds_config  # noqa: E402
from megatron_qwen.rlhf.ppo.config import PPOTrainConfig  # noqa: E402
from megatron_qwen.rlhf.ppo.rollout import generate  # noqa: E402
from megatron_qwen.rlhf.ppo.trainer import PPOTrainer  # noqa: E402

GREEDY = 1e-6  # a top-p this small keeps only the most likely token


def check_uneven_stop_under_zero3(assets: Path) -> None:
    """Rank 1 stops after one token, rank 0 runs to the limit: nobody may hang, and rank 0's
    tokens must equal greedy decoding with the plain (unpartitioned) model."""
    rank = dist.get_rank()
    plain = hf_model.load_causal_lm(assets / "actor").eval()
    ds = make_ds_config(micro_batch_size=1, global_batch_size=2, world_size=2, zero_stage=3, train=False)
    engine = init_inference_engine(hf_model.load_causal_lm(assets / "actor"), ds)
    prompts = [[10 + rank, 11, 12], [13, 14 + rank]]
    first = generate(engine.module, prompts, [0, 1], max_new_tokens=1, stop_token_id=-1,
                     pad_token_id=ppo_tiny.PAD, top_p=GREEDY)
    # rank 1 stops on whatever it emits first; rank 0's stop token never comes
    stop = int(first.responses[0, 0]) if rank == 1 else -1
    if rank == 1:
        prompts = [prompts[0], prompts[0]]
    out = generate(engine.module, prompts, [0, 1], max_new_tokens=5, stop_token_id=stop,
                   pad_token_id=ppo_tiny.PAD, top_p=GREEDY)
    ref = generate(plain, prompts, [0, 1], max_new_tokens=5, stop_token_id=stop,
                   pad_token_id=ppo_tiny.PAD, top_p=GREEDY)
    if rank == 1:
        assert out.finished.all() and out.response_lengths.tolist() == [1, 1], out.response_mask
    else:
        assert not out.finished.any() and out.response_lengths.tolist() == [5, 5]
    # rank 1 kept stepping (padding) until rank 0 was done
    assert out.responses.shape[1] == 5, out.responses.shape
    n = out.response_lengths
    for i in range(2):
        assert out.responses[i, : n[i]].tolist() == ref.responses[i, : n[i]].tolist(), (rank, out.responses, ref.responses)
    print(f"rank {rank}: uneven stop under ZeRO-3 ok", flush=True)


def main() -> None:
    assets, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    init_distributed()
    torch.set_num_threads(1)
    check_uneven_stop_under_zero3(assets)
    paths = {"actor": assets / "actor", "rm": assets / "rm", "prompts": assets / "prompts.jsonl",
             "ptx": assets / "ptx"}
    layouts = {
        "zero2": dict(actor_zero_stage=2, critic_zero_stage=2, ref_zero_stage=0, reward_zero_stage=0),
        "zero3": dict(actor_zero_stage=3, critic_zero_stage=3, ref_zero_stage=3, reward_zero_stage=3),
    }
    for name, layout in layouts.items():
        run_dir = out / name
        args = ppo_tiny.recipe_args(paths, run_dir, train_iters=steps, **layout)
        cfg = build_config(PPOTrainConfig, {}, parse_overrides(PPOTrainConfig, args))
        PPOTrainer(cfg).fit()
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"{name} done", flush=True)


if __name__ == "__main__":
    main()
