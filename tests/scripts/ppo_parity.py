"""2-process PPO checks (run under torchrun, gloo): ZeRO-3 generation with ranks stopping at
different lengths (per-forward gather and gathered once); models built partitioned under ZeRO-3;
the gathered, micro-batched rollout samples what the old sampler did; then a full PPO run under
ZeRO-2 and one under ZeRO-3 (gathered generation in micro-batches of one row).

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
from megatron_qwen.rlhf.deepspeed_config import (init_distributed, init_inference_engine,  # noqa: E402
                                                 init_train_engine, make_ds_config, zero3_construction)
from megatron_qwen.rlhf.ppo.config import PPOTrainConfig  # noqa: E402
from megatron_qwen.rlhf.ppo.generator import GenerationRequest, InProcessGenerator, full_weights  # noqa: E402
from legacy_rollout import legacy_generate  # noqa: E402
from megatron_qwen.rlhf.ppo.rollout import generate  # noqa: E402
from megatron_qwen.rlhf.ppo.trainer import PPOTrainer  # noqa: E402

GREEDY = 1e-6  # a top-p this small keeps only the most likely token


def check_uneven_stop_under_zero3(assets: Path) -> None:
    """Rank 1 stops after one token, rank 0 runs to the limit: nobody may hang, and rank 0's
    tokens must equal greedy decoding with the plain (unpartitioned) model."""
    rank = dist.get_rank()
    plain = hf_model.load_causal_lm(assets / "actor").eval()
    ds = make_ds_config(micro_batch_size=1, global_batch_size=2, world_size=2, zero_stage=3, train=False)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the tiny model: none kept whole
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
    # gathered once: the same tokens, and forwards are local (rank 1 runs its prefill only)
    forwards = []
    hook = engine.module.register_forward_hook(lambda *a: forwards.append(1))
    request = GenerationRequest(prompts=prompts, seeds=[0, 1], prompt_index=[0, 1], max_new_tokens=5,
                                stop_token_id=stop, pad_token_id=ppo_tiny.PAD, top_p=GREEDY)
    gathered = InProcessGenerator(engine, gather_params=True).generate(request)
    hook.remove()
    assert torch.equal(gathered.sequences, out.sequences), (rank, gathered.sequences, out.sequences)
    assert len(forwards) == (1 if rank == 1 else 5), (rank, len(forwards))
    assert_partitioned(engine.module, "inference engine after a gathered rollout")
    print(f"rank {rank}: uneven stop under ZeRO-3 ok", flush=True)


def local_share(module: torch.nn.Module) -> float:
    """This rank's share of the parameters' elements (ZeRO-3: its partitions)."""
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    return local / full


def assert_partitioned(module: torch.nn.Module, what: str) -> None:
    """Each rank stores half of every parameter, and none but ZeRO's persistent (small) ones is
    resident whole."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    share = local_share(module)
    assert 0.5 <= share < 0.55, (what, share)  # partitions are padded up to whole elements
    whole = [n for n, p in module.named_parameters()
             if not p.ds_persist and p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
    assert not whole, (what, whole)


def check_zero3_construction_and_gathered_rollout(assets: Path) -> None:
    """Models are partitioned as they are built; a training ZeRO-3 actor's gathered,
    micro-batched rollout equals the old per-token-gather sampler, before and after a step."""
    rank = dist.get_rank()
    ds = make_ds_config(micro_batch_size=1, global_batch_size=2, world_size=2, zero_stage=3)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the tiny model: none kept whole
    with zero3_construction(ds):
        actor = hf_model.load_causal_lm(assets / "actor")
        critic = hf_model.load_with_head(assets / "rm", require_head=True)
    assert_partitioned(actor, "causal LM at construction")
    assert_partitioned(critic.backbone, "backbone at construction")
    engine = init_train_engine(actor, ds, lr=1e-2)
    # the seam's weight stream: every parameter whole, as on disk, one at a time
    plain = dict(hf_model.load_causal_lm(assets / "actor").named_parameters())
    streamed = dict(full_weights(engine))
    assert streamed.keys() == plain.keys(), (sorted(streamed), sorted(plain))
    assert all(torch.equal(streamed[k], plain[k]) for k in plain), rank
    prompts = [[10 + rank, 11, 12], [13, 14 + rank], [15, 16, 17, 18], [19]]
    seeds = [100 + 4 * rank + i for i in range(4)]
    request = GenerationRequest(prompts=prompts, seeds=seeds, prompt_index=list(range(4)), max_new_tokens=6,
                                stop_token_id=ppo_tiny.STOP, pad_token_id=ppo_tiny.PAD, top_p=0.9)
    for phase in ("before", "after a train step"):
        old = legacy_generate(engine.module, prompts, seeds, max_new_tokens=6, stop_token_id=ppo_tiny.STOP,
                              pad_token_id=ppo_tiny.PAD, top_p=0.9)
        for gather, micro in ((True, 1), (False, 3), (True, None)):
            new = InProcessGenerator(engine, micro_batch_size=micro, gather_params=gather).generate(request)
            for field in ("sequences", "attention_mask", "response_mask", "finished"):
                assert torch.equal(getattr(new, field), getattr(old, field)), (rank, phase, gather, micro, field)
        assert_partitioned(engine.module, f"actor engine {phase}")
        ids = old.sequences
        engine.backward(engine(input_ids=ids, attention_mask=old.attention_mask, labels=ids).loss)
        engine.step()
    print(f"rank {rank}: ZeRO-3 construction and gathered rollout ok", flush=True)


def main() -> None:
    assets, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    init_distributed()
    torch.set_num_threads(1)
    check_uneven_stop_under_zero3(assets)
    check_zero3_construction_and_gathered_rollout(assets)
    paths = {"actor": assets / "actor", "rm": assets / "rm", "prompts": assets / "prompts.jsonl",
             "ptx": assets / "ptx"}
    layouts = {
        "zero2": dict(actor_zero_stage=2, critic_zero_stage=2, ref_zero_stage=0, reward_zero_stage=0),
        "zero3": dict(actor_zero_stage=3, critic_zero_stage=3, ref_zero_stage=3, reward_zero_stage=3,
                      generation_micro_batch_size=1),
    }
    for name, layout in layouts.items():
        run_dir = out / name
        args = ppo_tiny.recipe_args(paths, run_dir, train_iters=steps, **layout)
        cfg = build_config(PPOTrainConfig, {}, parse_overrides(PPOTrainConfig, args))
        trainer = PPOTrainer(cfg)
        e = trainer.engines
        assert e.actor.zero_overlap_comm() and e.critic.zero_overlap_comm(), name
        if name == "zero3":
            from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

            for who in ("ref", "reward"):  # inference engines: no optimizer state
                assert isinstance(getattr(e, who).optimizer, DeepSpeedZeRoOffload), (who, getattr(e, who).optimizer)
            for who in ("actor", "critic", "ref", "reward"):
                assert_partitioned(getattr(e, who).module, who)
        trainer.fit()
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"{name} done", flush=True)


if __name__ == "__main__":
    main()
