"""The training loop shared by pretraining and SFT, on megatron-core's pieces.

One iteration: every micro-batch of this rank's share of the global batch goes through
megatron-core's pipeline schedule (no pipelining, 1F1B, or interleaved 1F1B), which also reduces
gradients over data-parallel ranks; then the NaN guard, the LR schedule and the optimizer step.
A task is only a dataset provider: it returns (train, valid, test) datasets of micro-batch dicts
with ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (and optionally ``attention_mask``);
the loss is the masked token mean, so SFT's loss mask needs nothing else here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_qwen.config import ConfigError, dumps, to_dict
from megatron_qwen.model.attention import flash_attn_func
from megatron_qwen.model.varlen import packed_to_device, thd_micro_batch
from megatron_qwen.runtime.collectives import all_reduce_scalars
from megatron_qwen.training import checkpoint as ckpt
from megatron_qwen.training import metrics as mx
from megatron_qwen.training.optimizer import build_optimizer

# --------------------------------------------------------------------------- tasks


def _pretrain_provider(cfg, sizes):
    from megatron_qwen.data.pretrain import build_pretrain_datasets

    return build_pretrain_datasets(cfg, sizes)


def _sft_provider(cfg, sizes):
    try:
        from megatron_qwen.data import sft
    except ImportError as exc:
        raise ConfigError(f"--task sft needs megatron_qwen.data.sft ({exc})") from None
    return sft.build_sft_datasets(cfg, sizes)


DATASET_PROVIDERS: dict[str, Callable] = {"pretrain": _pretrain_provider, "sft": _sft_provider}


def register_dataset_provider(task: str, provider: Callable) -> None:
    """``provider(cfg, sizes) -> (train, valid, test)``; ``sizes`` are samples per split."""
    DATASET_PROVIDERS[task] = provider


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why."""


class SkipGuard:
    """Counts steps skipped for a non-finite loss or grad norm; stops after N in a row."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0

    def update(self, iteration: int, finite: bool) -> bool:
        """Record one step; True when it must be skipped. Raises TrainingStopped at the limit."""
        if finite:
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingStopped(
                f"iteration {iteration}: {self.in_a_row} iterations in a row had a NaN/Inf loss or "
                f"grad norm (--max-skipped-iters-in-a-row {self.max_in_a_row}); stopping. Lower "
                f"--lr, check the data, or resume from an earlier checkpoint")
        return True


class ExitSignal:
    """SIGTERM / SIGUSR1 (Slurm preemption) set a flag; ranks agree on it at each iteration end."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool):
        self.received = False
        self._previous = {}
        if enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def agreed(self) -> bool:
        return bool(all_reduce_scalars([1.0 if self.received else 0.0], device=_device(), op="max")[0])

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------- model


def build_wrapped_model(cfg, use_bf16: bool):
    """Model chunks wrapped for training: (Float16Module for BF16) + megatron-core DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_qwen.model import build_model
    from megatron_qwen.model.layer_spec import initialize_tp_comm_overlap, te_importable

    impl = cfg.transformer_impl(torch.cuda.is_available(), te_importable())
    if torch.distributed.get_rank() == 0:
        print(f"transformer_impl: {impl}", flush=True)
    if cfg.parallel.tp_comm_overlap:  # choose_transformer_impl made sure this is TE
        initialize_tp_comm_overlap(cfg.model, cfg.parallel, cfg.train.micro_batch_size,
                                   torch.bfloat16 if use_bf16 else torch.float32)
    chunks = build_model(dataclasses.replace(cfg.model, transformer_impl=impl), cfg.parallel,
                         params_dtype=torch.bfloat16 if use_bf16 else torch.float32)
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    for c in chunks:  # read by DDP (gradient scaling) and the schedule: set before wrapping
        c.config.calculate_per_token_loss = cfg.train.calculate_per_token_loss
    if use_bf16:
        chunks = [Float16Module(c.config, c) for c in chunks]
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the loop's SkipGuard handles non-finite steps
        bucket_size=max(40_000_000, 1_000_000 * torch.distributed.get_world_size()) if p.overlap_grad_reduce else None,
    )
    # only the first chunk's buffers are bucketed: later chunks' grads arrive last in a step
    return [DistributedDataParallel(config=ckpt.unwrap(c).config, ddp_config=ddp_config, module=c,
                                    disable_bucketing=i > 0)
            for i, c in enumerate(chunks)]


def _hook_schedule(model, optimizer, cfg) -> None:
    """Tell megatron-core's schedule how to scale the loss and reduce/overlap gradients."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.timers = None
    if not torch.cuda.is_available():
        # gloo matches a pair's messages by order only: batched p2p with PP=2 + interleaving
        # pairs a forward activation with a backward gradient. The unbatched path sends the
        # two directions on different groups.
        config.batch_p2p_comm = False
    if cfg.parallel.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        config.grad_sync_func = [m.start_grad_sync for m in model]
        if len(model) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    if cfg.parallel.overlap_param_gather:
        config.param_sync_func = [m.start_param_sync for m in model]
        if len(model) == 1:
            config.param_sync_func = config.param_sync_func[0]


# --------------------------------------------------------------------------- steps


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(sum of the per-token losses under the mask, number of those tokens, report).

    megatron-core's three-value form: without ``calculate_per_token_loss`` the schedule divides
    the sum by the count and the number of micro-batches (a mean of micro-batch means); with it,
    the gradients are divided once by the global batch's token count (all-reduced over DP)."""
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.float().reshape(-1)
    total = torch.sum(losses * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), count.detach().float()])}


def _forward_step(data_iterator, model):
    """One micro-batch. Packed documents (a ``cu_seqlens`` in the batch: SFT, pretraining with
    --reset-attention-mask) go as one THD row with megatron-core's PackedSeqParams."""
    from megatron.core import parallel_state as ps

    batch = next(data_iterator)
    if ps.get_context_parallel_world_size() > 1:  # this rank's two load-balanced chunks
        from megatron_qwen.runtime.mcore_version import batch_on_this_cp_rank

        batch = batch_on_this_cp_rank(dict(batch))
    dev = _device()
    packed = None
    if "cu_seqlens" in batch:
        batch, packed = thd_micro_batch(batch)
        packed = packed_to_device(packed, dev)
    mask = batch.get("attention_mask")
    output = model(batch["tokens"].to(dev, non_blocking=True), batch["position_ids"].to(dev, non_blocking=True),
                   None if mask is None else mask.to(dev, non_blocking=True),
                   labels=batch["labels"].to(dev, non_blocking=True), packed_seq_params=packed)
    return output, partial(_loss_func, batch["loss_mask"].to(dev, non_blocking=True))


def _mean_loss(losses: list, per_token: bool) -> Optional[float]:
    """The loss the step optimised (last stage only): the global batch's token mean with
    ``per_token``, else the mean of the micro-batch means over all data-parallel ranks."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    sums = torch.stack([d["lm loss"].float() for d in losses])  # [micro-batches, (sum, count)]
    if ps.get_context_parallel_world_size() > 1:  # each CP rank holds part of every sequence
        torch.distributed.all_reduce(sums, group=ps.get_context_parallel_group())
        group = ps.get_data_parallel_group()
    else:
        group = ps.get_data_parallel_group(with_context_parallel=True)
    if per_token:
        local = sums.sum(dim=0)
    else:
        local = torch.stack([(sums[:, 0] / sums[:, 1].clamp(min=1.0)).sum(), sums.new_tensor(float(len(sums)))])
    torch.distributed.all_reduce(local, group=group)
    return (local[0] / local[1].clamp(min=1.0)).item()


def _grads_finite(model) -> bool:
    """Whether this rank's gradients are all finite: its own contributions and, with the
    distributed optimizer, the reduced shard it owns (a non-finite sum shows up there). Local
    work (the largest magnitude per tensor); the ranks agree through the loss flag's all-reduce."""
    grads = [p.main_grad for m in model for p in m.parameters() if getattr(p, "main_grad", None) is not None]
    return not grads or math.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf).item())


def _all_ranks_max(x: float) -> float:
    return all_reduce_scalars([x], device=_device(), op="max")[0]


@dataclasses.dataclass
class StepResult:
    loss: Optional[float]  # None off the last pipeline stage
    grad_norm: Optional[float]
    lr: float
    skipped: bool


class Trainer:
    """Owns the model, optimizer, schedule and data position of one run."""

    def __init__(self, cfg):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg = cfg
        self.dp = cfg.check_world(torch.distributed.get_world_size())
        self.dp_rank = ps.get_data_parallel_rank()  # the CP ranks of a group read the same samples
        self.num_micro = cfg.num_microbatches(self.dp)
        self.use_bf16 = cfg.compute_dtype(torch.cuda.is_available()) == torch.bfloat16
        self.model = build_wrapped_model(cfg, self.use_bf16)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.use_bf16)
        _hook_schedule(self.model, self.optimizer, cfg)
        self.forward_backward = get_forward_backward_func()
        self.iteration = 0
        self.consumed_samples = 0
        self.guard = SkipGuard(cfg.train.max_skipped_iters_in_a_row)

    @property
    def schedule_shape(self) -> dict:
        """The schedule's activation shape: [s, b, h], or with packed documents one THD row of
        b * s tokens ([b * s, 1, h], what the pipeline stages send each other)."""
        s, b = self.cfg.model.seq_length, self.cfg.train.micro_batch_size
        if self.cfg.packs_documents():
            return {"seq_length": s * b, "micro_batch_size": 1}
        return {"seq_length": s, "micro_batch_size": b}

    # -- data
    def _iterators(self, dataset, consumed: int):
        from megatron_qwen.data.pretrain import build_data_iterator

        n = len(self.model)
        its = [build_data_iterator(dataset, consumed, self.cfg.train.micro_batch_size, self.dp_rank,
                                   self.dp, self.cfg.data.num_workers, seed=self.cfg.train.seed)
               for _ in range(n)]
        return its[0] if n == 1 else its

    # -- one optimizer step
    def train_step(self, data_iterator) -> StepResult:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.forward_backward(
            forward_step_func=_forward_step, data_iterator=data_iterator, model=self.model,
            num_microbatches=self.num_micro, **self.schedule_shape, forward_only=False)
        loss = _mean_loss(losses, self.cfg.train.calculate_per_token_loss)
        # one flag for the loss and the gradients, agreed by every rank before the step; the
        # step computes the (all-reduced) grad norm once, for clipping, and returns it
        finite_here = (loss is None or math.isfinite(loss)) and _grads_finite(self.model)
        finite = not _all_ranks_max(0.0 if finite_here else 1.0)
        iteration = self.iteration + 1
        # the LR of iteration i is the schedule at i (warm-up starts above zero)
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = None
        if self.guard.update(iteration, finite):
            skipped = True
        elif self.cfg.optim.clip_grad > 0:
            ok, grad_norm, _ = self.optimizer.step()  # the norm it clipped with
            skipped = not ok
        else:  # without clipping step() takes no norm: take one for the log
            self.optimizer.prepare_grads()
            grad_norm = self.optimizer.get_grad_norm()
            ok, _, _ = self.optimizer.step()
            skipped = not ok
        self.iteration = iteration
        self.consumed_samples += self.cfg.train.global_batch_size
        return StepResult(loss, grad_norm, lr, skipped)

    def sync_params(self) -> None:
        """With --overlap-param-gather the last step's parameters are all-gathered lazily by the
        next forward; a checkpoint needs them now (megatron-core's hook toggle does a sync)."""
        if self.cfg.parallel.overlap_param_gather:
            for m in self.model:
                m.disable_forward_pre_hook(param_sync=True)
                m.enable_forward_pre_hook()

    @torch.no_grad()
    def evaluate(self, dataset) -> Optional[float]:
        if dataset is None or len(dataset) == 0:
            return None
        for m in self.model:
            m.eval()
        it = self._iterators(dataset, 0)
        total, count = 0.0, 0
        n_batches = min(self.cfg.train.eval_iters, len(dataset) // self.cfg.train.global_batch_size)
        for _ in range(n_batches):
            losses = self.forward_backward(
                forward_step_func=_forward_step, data_iterator=it, model=self.model,
                num_microbatches=self.num_micro, **self.schedule_shape, forward_only=True)
            loss = _mean_loss(losses, self.cfg.train.calculate_per_token_loss)
            if loss is not None:
                total, count = total + loss, count + 1
        for m in self.model:
            m.train()
        return total / count if count else None


# --------------------------------------------------------------------------- the run


def _is_logging_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def train(cfg) -> list[dict]:
    """Run ``cfg`` to ``--train-iters`` (or a stop signal); return the logged records.

    Distributed state must be initialised (``megatron_qwen.runtime.init_distributed``)."""
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        print("resolved config:\n" + dumps(cfg), flush=True)
    t, ck = cfg.train, cfg.checkpoint
    if t.task not in DATASET_PROVIDERS:
        raise ConfigError(f"--task {t.task!r}: known tasks are {', '.join(sorted(DATASET_PROVIDERS))}")
    # what the attention kernel, the save directory and the load paths would refuse later, refused now
    from megatron_qwen.model.layer_spec import te_importable

    cfg.check_kernels(on_gpu=torch.cuda.is_available(), flash_available=flash_attn_func is not None,
                      te_available=te_importable())
    if ck.save:
        ck.check_save_writable()
    ckpt.check_load_paths(ck)
    from megatron_qwen.data.pretrain import split_sizes

    # data first: a wrong path or tokenizer fails before minutes of model building
    sizes = split_sizes(t.train_iters, t.global_batch_size, t.eval_interval, t.eval_iters)
    train_ds, valid_ds, _ = DATASET_PROVIDERS[t.task](cfg, sizes)
    trainer = Trainer(cfg)
    if ck.load and ckpt.has_checkpoint(ck.load):
        trainer.iteration, trainer.consumed_samples = ckpt.load_checkpoint(
            ck.load, trainer.model, trainer.optimizer, trainer.scheduler, cfg)
    elif ck.pretrained_checkpoint:
        if not ckpt.has_checkpoint(ck.pretrained_checkpoint):
            raise ConfigError(f"--pretrained-checkpoint {ck.pretrained_checkpoint}: no checkpoint there")
        base = dataclasses.replace(cfg, checkpoint=dataclasses.replace(ck, finetune=True))
        ckpt.load_checkpoint(ck.pretrained_checkpoint, trainer.model, trainer.optimizer,
                             trainer.scheduler, base)
    elif ck.load and rank0:
        print(f"--load {ck.load}: no checkpoint there yet; starting from scratch", flush=True)
    trainer.scheduler.num_steps = trainer.iteration

    log_rank = _is_logging_rank()
    writer = mx.MetricsWriter(cfg.logging, to_dict(cfg), enabled=log_rank)
    metrics_file = Path(cfg.logging.metrics_file) if cfg.logging.metrics_file and log_rank else None
    peak = mx.peak_tflops()
    stop = ExitSignal(ck.exit_signal_handler)
    records: list[dict] = []
    tokens_per_iter = t.global_batch_size * cfg.model.seq_length

    def save(last: bool):
        if ck.save:
            trainer.sync_params()
            ckpt.save_checkpoint(ck.save, trainer.iteration, trainer.model, trainer.optimizer,
                                 trainer.scheduler, trainer.consumed_samples, cfg, ck.keep_last_k)
            if last:  # an async save is complete (and published) before the run stops
                ckpt.finalize_async_saves(blocking=True)

    try:
        data = trainer._iterators(train_ds, trainer.consumed_samples) if trainer.iteration < t.train_iters else None
        window_start, window_iters = time.perf_counter(), 0
        while trainer.iteration < t.train_iters:
            step = trainer.train_step(data)
            window_iters += 1
            it = trainer.iteration
            if it % cfg.logging.log_interval == 0 or it == t.train_iters:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                rec = {"iteration": it, "lm_loss": step.loss, "grad_norm": step.grad_norm, "lr": step.lr,
                       "skipped_iters": trainer.guard.total, "consumed_samples": trainer.consumed_samples,
                       "iter_time_s": elapsed / window_iters,
                       **mx.throughput(cfg.model, tokens_per_iter * window_iters, elapsed,
                                       torch.distributed.get_world_size(), peak)}
                if cfg.logging.log_memory:
                    rec.update(mx.memory_gib())
                if log_rank:
                    records.append(rec)
                    writer.line(mx.format_train_line(it, t.train_iters, {**rec, "grad_norm": rec["grad_norm"] or float("nan")}))
                    writer.scalars(it, rec)
                    if metrics_file:
                        with metrics_file.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                window_start, window_iters = time.perf_counter(), 0
            if t.eval_interval and it % t.eval_interval == 0:
                val = trainer.evaluate(valid_ds)
                if log_rank and val is not None:
                    writer.line(f"validation at iteration {it} | lm loss {val:.6E} | ppl {math.exp(min(val, 50)):.3f}")
                    writer.scalars(it, {"lm_loss": val}, prefix="valid")
                    if metrics_file:
                        with metrics_file.open("a") as f:
                            f.write(json.dumps({"iteration": it, "valid_lm_loss": val}) + "\n")
            signalled = stop.agreed()
            periodic = ck.save_interval and it % ck.save_interval == 0
            exiting = signalled or (t.exit_interval and it % t.exit_interval == 0)
            if periodic or exiting or it == t.train_iters:
                save(last=exiting or it == t.train_iters)
            elif ck.async_save:
                ckpt.finalize_async_saves(blocking=False)  # publish a finished background save
            if exiting:
                if rank0:
                    why = "signal received" if signalled else f"--exit-interval {t.exit_interval}"
                    print(f"exiting at iteration {it} ({why}) after saving", flush=True)
                break
    except TrainingStopped as exc:
        if rank0:
            print(f"error: {exc}", flush=True)
        ckpt.abort_async_saves()
        raise
    except BaseException:
        ckpt.abort_async_saves()  # an unfinished background save stays unpublished (.tmp)
        raise
    finally:
        stop.restore()
        writer.close()
    return records
