"""Worker for tests/test_collectives.py (2 gloo processes): every collective the package issues
gets a tensor that is on the compute device on a GPU node, and the training step issues its
grad-norm all-reduce once.

    torchrun --nproc-per-node 2 collectives_check.py WORK_DIR

Each phase runs the real code path under tests/collective_guard.py; a phase that hands a
collective a would-be-CPU tensor records the guard's message instead of "ok". Phases: the
reward-model trainer (steps + evaluation), a PPO step (rollout, scoring, critic and actor
updates with ptx), the Megatron loop (train steps, evaluation, exit-signal agreement),
perplexity and the TP parameter count; then the step's all-reduce count against megatron-core's
separate prepare_grads / get_grad_norm / step calls, with bitwise-equal losses and grad norms.
Rank 0 writes WORK_DIR/results.json.
"""

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2]))
import ppo_tiny  # noqa: E402
import rm_fixtures  # noqa: E402
from train_common import write_corpus  # noqa: E402

from tests.collective_guard import CollectiveGuard, OffDeviceCollective  # noqa: E402

MEGATRON = ["--model.preset", "tiny_vocab", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--num-workers", "0",
            "--seed", "7", "--eod-id", "999", "--log-interval", "1", "--use-distributed-optimizer"]


def rank0_makes(fn):
    if dist.get_rank() == 0:
        fn()
    dist.barrier()


def reward_model(work: Path) -> None:
    from megatron_qwen.rlhf.reward_trainer import main

    data, model = work / "rm_data", work / "rm_model"
    rank0_makes(lambda: (rm_fixtures.make_pairs(data, n_train=16, n_test=8),
                         rm_fixtures.make_tiny_qwen2(model)))
    with CollectiveGuard():
        main(["--model-path", str(model), "--train-data-path", str(data / "pairs_train.jsonl"),
              "--test-data-path", str(data / "pairs_test.jsonl"), "--seq-length", "64",
              "--global-batch-size", "8", "--micro-batch-size", "2", "--train-iters", "2",
              "--eval-interval", "1", "--zero-stage", "2", "--save", str(work / "rm_out")])


def ppo(work: Path) -> None:
    from megatron_qwen.config import build_config, parse_overrides
    from megatron_qwen.rlhf.ppo.config import PPOTrainConfig
    from megatron_qwen.rlhf.ppo.trainer import PPOTrainer

    assets = work / "ppo"
    paths = {"actor": assets / "actor", "rm": assets / "rm", "prompts": assets / "prompts.jsonl",
             "ptx": assets / "ptx"}

    def make():
        assets.mkdir(parents=True, exist_ok=True)
        ppo_tiny.make_actor(paths["actor"])
        ppo_tiny.train_reward_model(paths["rm"], steps=2)
        ppo_tiny.make_prompts(paths["prompts"])
        ppo_tiny.make_ptx(paths["ptx"])

    rank0_makes(make)
    args = ppo_tiny.recipe_args(paths, work / "ppo_out", train_iters=1, value_warmup_steps=0,
                                ppo_epochs=1, actor_zero_stage=3, critic_zero_stage=2)
    with CollectiveGuard():
        PPOTrainer(build_config(PPOTrainConfig, {}, parse_overrides(PPOTrainConfig, args))).train_step()


def megatron_loop(work: Path, data: str) -> None:
    from megatron_qwen.config import load_config
    from megatron_qwen.runtime import init_distributed
    from megatron_qwen.training.config import PretrainConfig
    from megatron_qwen.training.loop import train

    with CollectiveGuard():
        cfg = load_config(PretrainConfig, MEGATRON + [
            "--data-path", data, "--data-cache-path", str(work / "cache"), "--train-iters", "2",
            "--eval-interval", "2", "--eval-iters", "1"])
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        train(cfg)


def perplexity(work: Path) -> None:
    from megatron_qwen.config import ParallelConfig, load_model_config
    from megatron_qwen.inference.perplexity import total_nll
    from megatron_qwen.model import build_model
    from megatron_qwen.runtime import init_distributed

    with CollectiveGuard():
        init_distributed(ParallelConfig(), seed=1)
        model = build_model(load_model_config("tiny_vocab"), ParallelConfig())
        samples = torch.randint(0, 1000, (4, 17), generator=torch.Generator().manual_seed(0))
        nll, count = total_nll([m.eval() for m in model], samples, micro_batch_size=1)
        assert count == 4 * 16, count


def parameter_count(work: Path) -> None:
    from megatron_qwen.config import ParallelConfig, load_model_config
    from megatron_qwen.model import count_parameters
    from megatron_qwen.runtime import init_distributed

    with CollectiveGuard():
        init_distributed(ParallelConfig(tensor_model_parallel_size=2), seed=1)
        count_parameters(load_model_config("tiny_vocab"))


def step_all_reduces(work: Path, data: str) -> dict:
    """All-reduces of one Trainer.train_step vs megatron-core's prepare_grads + get_grad_norm +
    step (what the loop did before); 3 steps of each from the same start, bitwise compared."""
    from megatron_qwen.config import load_config
    from megatron_qwen.runtime import init_distributed
    from megatron_qwen.training.config import PretrainConfig
    from megatron_qwen.training.loop import Trainer, _all_ranks_max, _mean_loss

    def fresh():
        cfg = load_config(PretrainConfig, MEGATRON + [
            "--data-path", data, "--data-cache-path", str(work / "cache"), "--train-iters", "3"])
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        from megatron_qwen.data.pretrain import build_pretrain_datasets, split_sizes

        train_ds = build_pretrain_datasets(cfg, split_sizes(3, 4, 0, 0))[0]
        trainer = Trainer(cfg)
        return trainer, trainer._iterators(train_ds, 0)

    def separate_calls(trainer, it):
        """The step as megatron-core's three calls: norm, then step (which takes it again)."""
        for m in trainer.model:
            m.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        from megatron_qwen.training.loop import _forward_step

        losses = trainer.forward_backward(
            forward_step_func=_forward_step, data_iterator=it, model=trainer.model,
            num_microbatches=trainer.num_micro, seq_length=trainer.cfg.model.seq_length,
            micro_batch_size=trainer.cfg.train.micro_batch_size, forward_only=False)
        loss = _mean_loss(losses, False)
        _all_ranks_max(0.0)
        trainer.scheduler.step(increment=1)
        trainer.optimizer.prepare_grads()
        norm_before = trainer.optimizer.get_grad_norm()
        ok, grad_norm, _ = trainer.optimizer.step()
        assert ok and norm_before == grad_norm
        return loss, grad_norm

    out = {}
    with CollectiveGuard() as guard:
        trainer, it = fresh()
        counts, values = [], []
        for _ in range(3):
            before = guard.calls["all_reduce"]
            step = trainer.train_step(it)
            counts.append(guard.calls["all_reduce"] - before)
            values.append((step.loss, step.grad_norm))
        out["train_step"] = {"all_reduces": counts, "values": values}
        trainer, it = fresh()
        counts, values = [], []
        for _ in range(3):
            before = guard.calls["all_reduce"]
            values.append(separate_calls(trainer, it))
            counts.append(guard.calls["all_reduce"] - before)
        out["separate_calls"] = {"all_reduces": counts, "values": values}
        before = guard.calls["all_reduce"]
        trainer.optimizer.get_grad_norm()
        out["one_grad_norm"] = guard.calls["all_reduce"] - before
    return out


def main() -> None:
    work = Path(sys.argv[1])
    from megatron_qwen.rlhf.deepspeed_config import init_distributed

    init_distributed()
    torch.set_num_threads(1)
    data = str(work / "corpus")
    rank0_makes(lambda: write_corpus(data, vocab_size=1000, max_docs=40))
    results = {}
    phases = [("reward_model", lambda: reward_model(work)), ("ppo", lambda: ppo(work)),
              ("megatron_loop", lambda: megatron_loop(work, data)),
              ("perplexity", lambda: perplexity(work)), ("parameter_count", lambda: parameter_count(work))]
    for name, phase in phases:
        try:
            phase()
            results[name] = "ok"
        except OffDeviceCollective as exc:
            results[name] = str(exc)
        except Exception:  # noqa: BLE001 - recorded, the test prints it
            results[name] = "error: " + traceback.format_exc()
        dist.barrier()
    results["step_all_reduces"] = step_all_reduces(work, data)
    if dist.get_rank() == 0:
        (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":  # dist_checkpointing spawns helper processes that re-import this file
    main()
