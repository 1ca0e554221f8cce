"""The reward-model trainer: pairwise loss on comparison pairs, on a DeepSpeed ZeRO engine.

The story: config -> processes -> tokenizer and pairs -> backbone + head -> engine -> (resume)
-> steps of ``-log sigmoid(r_chosen - r_rejected)`` -> evaluation -> DeepSpeed checkpoint ->
export (HF backbone + head + reward statistics) for PPO.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_qwen.config import ConfigError, load_config, save_resolved, to_dict
from megatron_qwen.rlhf import hf_model
from megatron_qwen.rlhf.deepspeed_config import (device, ds_config_from_group, init_distributed,
                                                 init_train_engine, zero3_construction)
from megatron_qwen.rlhf.heads import gather_at
from megatron_qwen.rlhf.reward_config import RewardModelConfig
from megatron_qwen.data.preference import PreferenceDataset, collate_pairs
from megatron_qwen.rlhf.reward_data import epoch_order, eval_shard, step_micro_batches
from megatron_qwen.rlhf.reward_logging import MetricsLogger
from megatron_qwen.rlhf.reward_pairs import data_report, load_pairs, load_rm_tokenizer
from megatron_qwen.checkpoint.weights_only import torch_load
from megatron_qwen.memory_plan import check_trainer_start
from megatron_qwen.runtime import device_check, rng_state
from megatron_qwen.runtime.collectives import all_reduce_scalars


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` (Bradley-Terry)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_rewards(engine, batch: dict) -> tuple:
    """(r_chosen, r_rejected) of one collated micro-batch."""
    dev = device()
    values = engine(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
    rewards = gather_at(values, batch["end_index"].to(dev))
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


@torch.no_grad()
def evaluate(engine, pairs: PreferenceDataset, micro_batch_size: int, pad_id: int) -> dict:
    """Pairwise accuracy, loss and reward mean/std over ``pairs`` (all ranks take part).

    Ties count as wrong. The statistics cover the rewards of both responses of every pair:
    they are what PPO normalises its rewards with.
    """
    was_training = engine.training
    engine.eval()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    sums = [0.0] * 7  # n, correct, loss, sum r, sum r^2, sum chosen, sum rejected
    for indices, real in eval_shard(len(pairs), micro_batch_size, world, rank):
        rc, rr = pair_rewards(engine, collate_pairs([pairs[i] for i in indices], pad_id))
        keep = torch.tensor(real, device=rc.device)
        rc, rr = rc[keep].double(), rr[keep].double()
        sums[0] += rc.numel()
        sums[1] += (rc > rr).sum().item()
        sums[2] += -F.logsigmoid(rc - rr).sum().item()
        sums[3] += (rc.sum() + rr.sum()).item()
        sums[4] += (rc.pow(2).sum() + rr.pow(2).sum()).item()
        sums[5] += rc.sum().item()
        sums[6] += rr.sum().item()
    n, correct, loss, s, s2, sc, sr = all_reduce_scalars(sums, device=engine.device)
    if was_training:
        engine.train()
    if n == 0:
        return {"count": 0}
    mean = s / (2 * n)
    std = math.sqrt(max(s2 / (2 * n) - mean * mean, 0.0))
    return {"count": int(n), "accuracy": correct / n, "loss": loss / n, "mean": mean, "std": std,
            "chosen_mean": sc / n, "rejected_mean": sr / n}


def _rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_state_rank{rank}.pt"


def save_rng_state(tag_dir: Path, rank: int) -> None:
    """This rank's RNG states (dropout's draws differ per rank), written atomically."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    out = _rng_file(tag_dir, rank)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(rng_state.capture(), tmp)
    tmp.replace(out)


def load_rng_state(tag_dir: Path, rank: int) -> dict:
    """The RNG states saved with this rank (rank 0's on a resume with more ranks than saved)."""
    path = _rng_file(tag_dir, rank)
    if not path.is_file() and rank > 0:
        path = _rng_file(tag_dir, 0)
    if not path.is_file():
        raise ConfigError(f"{path}: missing; a resume without the RNG states would draw other "
                          "dropout masks than the uninterrupted run")
    return torch_load(path, path)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _print0(*args) -> None:
    if _rank() == 0:
        print(*args, flush=True)


def train(cfg: RewardModelConfig) -> dict:
    """Run one reward-model training as configured; returns the summary (also saved as JSON)."""
    opt, ck = cfg.optim, cfg.checkpoint
    device_check.use_gpu(bf16=cfg.deepspeed.bf16)  # a missing GPU fails before reading data

    tokenizer = load_rm_tokenizer(cfg.model.tokenizer_path, cfg.model.model_path)
    train_pairs = load_pairs(cfg.data.train_data_path, tokenizer, cfg.data.seq_length)
    test_pairs = None
    if cfg.data.test_data_path:
        test_pairs = load_pairs(cfg.data.test_data_path, tokenizer, cfg.data.seq_length)
    have_test = test_pairs is not None and len(test_pairs) > 0
    steps_per_epoch = len(train_pairs) // opt.global_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg.data.train_data_path}: {len(train_pairs)} usable pairs, fewer than "
                          f"one global batch of {opt.global_batch_size}")
    total_steps = steps_per_epoch * opt.epochs
    if opt.train_iters is not None:
        total_steps = min(total_steps, opt.train_iters)
    dropped_per_epoch = len(train_pairs) - steps_per_epoch * opt.global_batch_size

    init_distributed(cfg.deepspeed.bf16)  # after the data checks: a bad input fails before any group
    world, rank = dist.get_world_size(), dist.get_rank()
    check_trainer_start(cfg, world, rank)  # the memory plan, before the model loads
    torch.manual_seed(opt.seed)

    ds_config = ds_config_from_group(cfg.deepspeed, micro_batch_size=opt.micro_batch_size,
                                     global_batch_size=opt.global_batch_size, world_size=world,
                                     gradient_clipping=opt.clip_grad)
    with zero3_construction(ds_config):  # ZeRO-3: each rank builds only its partition
        model = hf_model.load_with_head(cfg.model.model_path)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{cfg.model.model_path}: vocab_size {model.config.vocab_size} is smaller "
                          f"than the tokenizer's {tokenizer.vocab_size}")
    if cfg.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    engine = init_train_engine(model, ds_config, lr=opt.lr, weight_decay=opt.weight_decay,
                               betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
                               warmup_steps=opt.lr_warmup_iters)

    data_identity = {"train_data_path": str(Path(cfg.data.train_data_path).resolve()),
                     "num_pairs": len(train_pairs),
                     "global_batch_size": opt.global_batch_size, "seed": opt.seed}
    step = 0
    if ck.load:
        tag = None if ck.ckpt_step is None else f"global_step{ck.ckpt_step}"
        if tag is not None and not (Path(ck.load) / tag).is_dir():
            raise ConfigError(f"checkpoint.load={ck.load}: no checkpoint {tag}")
        path, client = engine.load_checkpoint(ck.load, tag=tag)
        if path is None:
            raise ConfigError(f"checkpoint.load={ck.load}: no DeepSpeed checkpoint (no 'latest' file)")
        for key, value in data_identity.items():
            if client.get(key) != value:
                raise ConfigError(f"checkpoint.load={ck.load}: saved with {key}={client.get(key)!r}, "
                                  f"now {value!r}; resume needs the same data order")
        step = int(client["step"])
        rng_state.restore(load_rng_state(Path(path).parent, rank))
        _print0(f"resumed from {path} at step {step}")

    logger = MetricsLogger(cfg.logging, to_dict(cfg)) if rank == 0 else None
    for name, pairs in (("train", train_pairs), ("test", test_pairs)):
        if pairs is not None:
            _print0(f"{name} {pairs.describe()}")
            for places in pairs.skips.places.values():
                for place in places[:5]:
                    _print0(f"  skipped {place}")
    _print0(f"reward model: {len(train_pairs)} train pairs, "
            f"{len(test_pairs) if test_pairs is not None else 0} test pairs, "
            f"{world} rank(s), ZeRO-{cfg.deepspeed.zero_stage}, "
            f"{ds_config['gradient_accumulation_steps']} accumulation step(s), {total_steps} steps")
    if dropped_per_epoch:
        _print0(f"note: the last {dropped_per_epoch} pairs of each epoch's order do not fill a "
                f"global batch and are not used in that epoch")

    def save_checkpoint() -> None:
        if ck.save:
            save_rng_state(Path(ck.save) / f"global_step{step}", rank)  # before DeepSpeed's `latest`
            engine.save_checkpoint(ck.save, tag=f"global_step{step}",
                                   client_state={"step": step, **data_identity})
            if rank == 0:
                save_resolved(cfg, Path(ck.save) / "config.yaml")

    history = []
    evals = []
    window = {"loss": 0.0, "correct": 0.0, "pairs": 0.0, "tokens": 0.0, "margin": 0.0}
    t_window = time.perf_counter()
    engine.train()
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(len(train_pairs), opt.seed, epoch)
        local = [0.0] * 5  # loss sum (per micro-batch mean x pairs), correct, pairs, tokens, margin
        for indices in step_micro_batches(order, in_epoch, opt.global_batch_size,
                                          opt.micro_batch_size, world, rank):
            batch = collate_pairs([train_pairs[i] for i in indices], tokenizer.pad)
            rc, rr = pair_rewards(engine, batch)
            loss = pairwise_loss(rc, rr)
            engine.backward(loss)
            engine.step()
            local[0] += loss.item() * len(indices)
            local[1] += (rc > rr).sum().item()
            local[2] += len(indices)
            local[3] += batch["attention_mask"].sum().item()
            local[4] += (rc - rr).sum().item()
        step += 1
        loss_sum, correct, npairs, tokens, margin = all_reduce_scalars(local, device=engine.device)
        norm = engine.get_global_grad_norm()  # before clipping; None at ZeRO-0 (DeepSpeed keeps none)
        record = {"step": step, "loss": loss_sum / npairs, "accuracy": correct / npairs,
                  "margin": margin / npairs, "lr": engine.get_lr()[0],
                  "grad_norm": None if norm is None else float(norm)}
        history.append(record)
        for key, value in zip(window, (loss_sum, correct, npairs, tokens, margin)):
            window[key] += value
        if step % cfg.logging.log_interval == 0 or step == total_steps:
            elapsed = time.perf_counter() - t_window
            line = {"step": step, "loss": window["loss"] / window["pairs"],
                    "accuracy": window["correct"] / window["pairs"],
                    "margin": window["margin"] / window["pairs"], "lr": record["lr"],
                    "pairs_per_s": window["pairs"] / elapsed, "tokens_per_s": window["tokens"] / elapsed}
            if logger:
                logger.log("train", line, step, total_steps)
            window = dict.fromkeys(window, 0.0)
            t_window = time.perf_counter()
        if cfg.logging.eval_interval and have_test and step % cfg.logging.eval_interval == 0 \
                and step < total_steps:
            ev = evaluate(engine, test_pairs, opt.micro_batch_size, tokenizer.pad)
            evals.append({"step": step, **ev})
            if logger:
                logger.log("test", ev, step, total_steps)
        if ck.save and ck.save_interval and step % ck.save_interval == 0 and step < total_steps:
            save_checkpoint()

    # Final evaluation: the test set if there is one, else the training pairs (the statistics
    # PPO normalises with must come from some scored data).
    final_pairs, final_name = (test_pairs, "test") if have_test else (train_pairs, "train")
    final = evaluate(engine, final_pairs, opt.micro_batch_size, tokenizer.pad)
    evals.append({"step": step, **final})
    if logger:
        logger.log(final_name, final, step, total_steps)
    save_checkpoint()
    stats = {"mean": final.get("mean", 0.0), "std": final.get("std", 1.0),
             "count": 2 * final.get("count", 0), "scored_on": final_name,
             "pairwise_accuracy": final.get("accuracy"), "step": step,
             "data": str(cfg.data.test_data_path if have_test else cfg.data.train_data_path)}
    export_dir = ck.export_dir or str(Path(ck.save) / "export")
    hf_model.export_with_head(engine, export_dir, stats, source_dir=cfg.model.model_path)
    summary = {"steps": step, "world_size": world, "zero_stage": cfg.deepspeed.zero_stage,
               "final": final, "final_on": final_name, "evals": evals, "history": history,
               "train_data": data_report(train_pairs),
               "test_data": data_report(test_pairs) if test_pairs is not None else None,
               "unused_pairs_per_epoch": dropped_per_epoch, "export_dir": export_dir}
    if rank == 0:
        out = Path(export_dir) / "train_summary.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(out)
        _print0(f"done: {final_name} accuracy {final.get('accuracy', float('nan')):.4f} over "
                f"{final.get('count', 0)} pairs, reward mean {stats['mean']:.4f} std "
                f"{stats['std']:.4f}; export {export_dir}")
    if logger:
        logger.close()
    return summary


def strip_launcher_args(argv: Sequence[str]) -> List[str]:
    """Drop the ``--local_rank=N`` the ``deepspeed`` launcher appends (LOCAL_RANK is in the env)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--local_rank", "--local-rank"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(RewardModelConfig, argv, description=RewardModelConfig.__doc__)
    try:
        return train(cfg)
    except (ConfigError, OSError) as exc:  # bad settings, missing or unreadable files
        raise SystemExit(f"error: {exc}")
