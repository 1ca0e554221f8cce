"""One DeepSpeed config per engine, generated from the recipe, and the engine constructors.

The reward model trains one engine; PPO trains two (actor, critic) and runs two for inference
(reference, reward). Each gets its own JSON config from :func:`make_ds_config`, so ZeRO stage,
offload and precision are chosen per engine. On CPU (``DS_ACCELERATOR=cpu``, gloo) the engines
get torch's AdamW, which needs no compiled op; ``offload_optimizer`` asks for DeepSpeedCPUAdam,
whose op DeepSpeed compiles on first use into ``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

import torch

from megatron_qwen.config import ConfigError


@dataclasses.dataclass
class DeepSpeedConfig:
    """ZeRO and precision of one training engine (group ``deepspeed``)."""

    zero_stage: int = 2  # 0 = plain data parallel, 1 optimizer, 2 + gradients, 3 + parameters
    offload_optimizer: bool = False  # optimizer states and step on CPU (DeepSpeedCPUAdam)
    offload_param: bool = False  # parameters on CPU between uses (ZeRO-3 only)
    bf16: bool = False  # bf16 weights/activations with fp32 master weights; fp32 when off
    gradient_accumulation_steps: Optional[int] = None  # None: global / (micro x data-parallel)
    gradient_checkpointing: bool = False  # recompute the backbone's activations in backward

    def validate(self) -> None:
        check_zero(self.zero_stage, self.offload_optimizer, self.offload_param, "deepspeed.")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise ConfigError("deepspeed.gradient_accumulation_steps must be >= 1")


def check_zero(stage: int, offload_optimizer: bool, offload_param: bool, prefix: str = "") -> None:
    """The ZeRO combinations DeepSpeed accepts, as one-line errors."""
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{prefix}zero_stage={stage}: choose 0, 1, 2 or 3")
    if offload_param and stage != 3:
        raise ConfigError(f"{prefix}offload_param needs zero_stage 3 (got {stage})")
    if offload_optimizer and stage == 0:
        raise ConfigError(f"{prefix}offload_optimizer needs zero_stage 1, 2 or 3")


def gradient_accumulation(global_batch_size: int, micro_batch_size: int, world_size: int,
                          accumulation: Optional[int] = None) -> int:
    """Micro-steps per optimizer step; the global batch must split evenly over ranks."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ConfigError(f"global_batch_size={global_batch_size} is not a multiple of "
                          f"micro_batch_size={micro_batch_size} x {world_size} data-parallel ranks")
    derived = global_batch_size // per_step
    if accumulation is not None and accumulation != derived:
        raise ConfigError(f"gradient_accumulation_steps={accumulation} but global_batch_size="
                          f"{global_batch_size} / (micro {micro_batch_size} x {world_size} ranks) = {derived}")
    return derived


def make_ds_config(*, micro_batch_size: int, global_batch_size: int, world_size: int,
                   zero_stage: int = 0, offload_optimizer: bool = False, offload_param: bool = False,
                   bf16: bool = False, gradient_clipping: float = 1.0,
                   gradient_accumulation_steps: Optional[int] = None, train: bool = True) -> dict:
    """The DeepSpeed JSON config of one engine.

    ``train=False`` is an inference engine (PPO's reference and reward): no optimizer section,
    no gradient clipping; under ZeRO-3 its parameters are still partitioned.
    """
    check_zero(zero_stage, offload_optimizer and train, offload_param)
    accumulation = gradient_accumulation(global_batch_size, micro_batch_size, world_size,
                                         gradient_accumulation_steps)
    zero: dict = {"stage": zero_stage}
    if zero_stage >= 2:
        # gradient reduction overlapped with backward. On CPU (gloo, DeepSpeed's no-op streams)
        # it runs the same code without concurrency: measured bit-identical to off at ZeRO-2/3,
        # and the 2-process PPO/RM parity tests run with it on. Its buffers: see docs/ppo.md.
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if zero_stage == 3:
        # export gathers 16-bit (or fp32) weights; small params stay whole to save gathers
        zero.update(stage3_gather_16bit_weights_on_model_save=True,
                    stage3_param_persistence_threshold=10_000,
                    # zero.Init otherwise replaces torch.nn.functional.linear, for the rest of the
                    # process and every model in it, by an autograd.Function (matmul + bias, a
                    # signature bind per call): half of a ZeRO-3 decode step's time on CPU
                    # (bench/ppo_step.py --profile). ZeRO-3 re-gathers a module's parameters
                    # before its backward, so the plain linear is correct (the parity tests)
                    memory_efficient_linear=False)
    if offload_optimizer and train:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        # we pass torch optimizers (AdamW) to ZeRO; DeepSpeed wants this acknowledged
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logger prints
        "wall_clock_breakdown": False,
    }
    if train and gradient_clipping:
        config["gradient_clipping"] = float(gradient_clipping)
    return config


def ds_config_from_group(group: DeepSpeedConfig, *, micro_batch_size: int, global_batch_size: int,
                         world_size: int, gradient_clipping: float = 1.0, train: bool = True) -> dict:
    """:func:`make_ds_config` from a recipe's ``deepspeed`` group."""
    return make_ds_config(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                          world_size=world_size, zero_stage=group.zero_stage,
                          offload_optimizer=group.offload_optimizer,
                          offload_param=group.offload_param, bf16=group.bf16,
                          gradient_clipping=gradient_clipping,
                          gradient_accumulation_steps=group.gradient_accumulation_steps, train=train)


# --------------------------------------------------------------------------- processes


def init_distributed(bf16: bool = False) -> None:
    """Join (or start, for a bare ``python`` run) the process group: nccl with a GPU, else gloo
    (only where no GPU is expected: ``runtime.device_check``; ``bf16`` expects one)."""
    from megatron_qwen.runtime import device_check

    device_check.use_gpu(bf16=bf16)
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:  # a bare `python tool.py`: a group of one
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port)):
            os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (minutes on first use)
        # that only its inference path calls; gloo's own collectives serve training.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


# --------------------------------------------------------------------------- engines


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0,
                    betas=(0.9, 0.95), eps: float = 1e-8, offload: bool = False):
    """AdamW with no decay on biases and norm weights; DeepSpeedCPUAdam when offloading."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def warmup_constant_schedule(optimizer, warmup_steps: int = 0):
    """Linear warm-up then a constant LR (the report's reward-model and PPO schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)


@contextlib.contextmanager
def zero3_construction(ds_config: dict):
    """For a ZeRO-3 engine, build its model already partitioned: transformers' ``from_pretrained``
    runs under ``deepspeed.zero.Init`` inside ``HfDeepSpeedConfig``, so no rank holds a full copy
    (host or device memory per rank ~ 1/world size). Other stages build a plain model."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference: keep it alive
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


# DeepSpeed's reduce bucket when the config sets none (elements)
DEFAULT_REDUCE_BUCKET = 500_000_000


def zero3_buffer_sizes(numel: int, world_size: int) -> dict:
    """The ZeRO-3 buffer sizes for a model of ``numel`` elements over ``world_size`` ranks: no
    buffer DeepSpeed allocates per rank is larger than one rank's partition.

    DeepSpeed's reduce bucket (``reduce_bucket_size``, 5e8 elements by default) is allocated
    whole at ``deepspeed.initialize`` (2 GB in fp32, 1 GB in bf16, per training engine, whatever
    the model's size), and in backward it fills with *whole* (unpartitioned) gradients until it
    is full or backward ends: for a model under 5e8 elements, every rank holds all of the
    model's gradients at once before the reduce-scatter. A bucket of one partition holds at most
    1/world of them; models with partitions above 5e8 elements keep DeepSpeed's size."""
    partition = -(-int(numel) // world_size)
    return {"reduce_bucket_size": max(1, min(DEFAULT_REDUCE_BUCKET, partition))}


def _with_zero3_buffers(model: torch.nn.Module, ds_config: dict) -> dict:
    """``ds_config`` with :func:`zero3_buffer_sizes` for ``model`` where it sets none (ZeRO-3)."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        return ds_config
    import torch.distributed as dist

    numel = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    world = dist.get_world_size() if dist.is_initialized() else 1
    sizes = {k: v for k, v in zero3_buffer_sizes(numel, world).items() if k not in zero}
    return {**ds_config, "zero_optimization": {**zero, **sizes}}


def init_train_engine(model: torch.nn.Module, ds_config: dict, *, lr: float,
                      weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8,
                      warmup_steps: int = 0):
    """A training engine with its optimizer and LR schedule; returns the DeepSpeed engine.
    Under ZeRO-3 its buffers are sized from the model (:func:`zero3_buffer_sizes`)."""
    import deepspeed

    from megatron_qwen.rlhf.safe_engine import safe_checkpoint_engine

    ds_config = _with_zero3_buffers(model, ds_config)
    offload = "offload_optimizer" in ds_config.get("zero_optimization", {})
    optimizer = build_optimizer(model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                offload=offload)
    scheduler = warmup_constant_schedule(optimizer, warmup_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config)
    safe_checkpoint_engine(engine)  # load_checkpoint runs no code from the files it reads
    return engine


def init_inference_engine(model: torch.nn.Module, ds_config: dict):
    """A frozen engine (PPO's reference and reward): no optimizer; ZeRO-3 partitions it."""
    import deepspeed

    for param in model.parameters():
        param.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine
