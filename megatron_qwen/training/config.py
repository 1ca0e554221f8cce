"""The trainer's config groups: data, optim, checkpoint, logging, train.

They compose with the model and parallel groups of ``megatron_qwen.config`` into
:class:`PretrainConfig`, the one config of ``pretrain_qwen.py``. Field names are Megatron-LM's
flag names (``--lr-warmup-iters`` is ``optim.lr_warmup_iters``), so existing launch scripts read
the same. The sequence length is the model group's ``seq_length`` (``--seq-length``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_qwen.config import ConfigError, ModelConfig, ParallelConfig
from megatron_qwen.data.sft import SFTDataArgs
from megatron_qwen.memory_plan.start_check import MemoryPlanConfig


@dataclasses.dataclass
class DataConfig:
    """Where the tokens come from and how they are cut into samples."""

    # Megatron's blend: [prefix] or [w1, prefix1, w2, prefix2, ...]; prefixes of .bin/.idx pairs
    data_path: Optional[list] = None  # indexed-dataset prefixes, or a blend: w1 prefix1 w2 prefix2 ...
    split: str = "98,2,0"  # train,valid,test weights over the documents of every corpus
    data_cache_path: Optional[str] = None  # where GPTDataset caches its index .npy files
    tokenizer_path: Optional[str] = None  # qwen.tiktoken; None: the one dashscope ships
    eod_id: Optional[int] = None  # document separator; None: the tokenizer's <|endoftext|>
    num_workers: int = 2  # DataLoader worker processes per rank
    reset_position_ids: bool = False  # restart position ids after each end-of-document token
    reset_attention_mask: bool = False  # no attention across documents packed in one sample
    eod_mask_loss: bool = False  # no loss on end-of-document tokens

    def validate(self) -> None:
        parts = [p for p in self.split.replace("/", ",").split(",") if p.strip()]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"data.split={self.split!r}: expected weights like 98,2,0") from None
        if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"data.split={self.split!r}: expected 1-3 non-negative weights like 98,2,0")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")

    def blend(self) -> tuple[list[str], Optional[list[float]]]:
        """``data_path`` as megatron-core's blend: (prefixes, weights or None)."""
        items = [str(x) for x in (self.data_path or [])]
        if not items:
            raise ConfigError("data.data_path is empty: give --data-path PREFIX or --data-path W1 P1 W2 P2")
        if len(items) == 1:
            return items, None
        if len(items) % 2:
            raise ConfigError(
                f"--data-path {' '.join(items)}: a blend is weight/prefix pairs (odd count given)")
        weights, prefixes = [], []
        for w, p in zip(items[0::2], items[1::2]):
            try:
                weights.append(float(w))
            except ValueError:
                raise ConfigError(f"--data-path: {w!r} is not a weight (expected W1 P1 W2 P2 ...)") from None
            if weights[-1] <= 0:
                raise ConfigError(f"--data-path: weight {w} of {p} must be > 0")
            prefixes.append(p)
        return prefixes, weights


@dataclasses.dataclass
class OptimConfig:
    """AdamW, the LR schedule and numerics (report section 2.4)."""

    lr: float = 3.0e-4  # peak learning rate
    min_lr: float = 3.0e-5  # learning rate at the end of the decay
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_warmup_iters: int = 0  # iterations of linear warm-up
    lr_warmup_fraction: Optional[float] = None  # of lr_decay_iters; replaces lr_warmup_iters
    lr_warmup_init: float = 0.0  # learning rate the warm-up starts from
    weight_decay: float = 0.1  # not applied to norms and biases (1-D parameters)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1.0e-8  # AdamW epsilon
    clip_grad: float = 1.0  # clip the global gradient norm to this (0: off)
    bf16: bool = False  # BF16 compute with FP32 master weights and grads (GPU only; CPU runs FP32)

    def validate(self) -> None:
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.lr_decay_style={self.lr_decay_style!r}: choose cosine, linear or constant")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim: need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr}) and lr > 0")
        if self.lr_warmup_fraction is not None and not 0.0 <= self.lr_warmup_fraction <= 1.0:
            raise ConfigError(f"optim.lr_warmup_fraction={self.lr_warmup_fraction} must be in [0, 1]")
        if self.lr_warmup_iters < 0:
            raise ConfigError("optim.lr_warmup_iters must be >= 0")
        if self.clip_grad < 0:
            raise ConfigError("optim.clip_grad must be >= 0 (0 disables clipping)")


@dataclasses.dataclass
class CheckpointConfig:
    """megatron-core distributed checkpoints in Megatron-LM's ``DIR/iter_NNNNNNN/`` layout."""

    save: Optional[str] = None  # directory to save checkpoints to
    load: Optional[str] = None  # directory to resume from (its latest iteration)
    save_interval: Optional[int] = None  # iterations; None: only at the end and on SIGTERM
    keep_last_k: Optional[int] = None  # delete older iter_* dirs; None keeps all
    # A checkpoint with model weights only (the converter's output) starts a fresh run from those
    # weights: iteration 0, new optimizer. Detected automatically; --finetune forces it.
    finetune: bool = False  # weights only: iteration 0, new optimizer (auto for converted)
    # Weights to start from when --load holds no checkpoint yet (continued pretraining from a
    # base model: a requeued job then resumes its own --save, not the base again).
    pretrained_checkpoint: Optional[str] = None  # weights to start from while --load holds no checkpoint yet
    no_load_optim: bool = False  # resume without the optimizer state
    no_load_rng: bool = False  # resume without the RNG states
    exit_signal_handler: bool = True  # SIGTERM/SIGUSR1: save a checkpoint, then exit cleanly
    # Saves write in a forked process while training goes on; a checkpoint becomes "latest" only
    # once every rank's writer has finished (checked each iteration, waited for at exit).
    async_save: bool = False  # write checkpoints in the background (megatron-core's async save)
    # The distributed optimizer is saved dp_reshardable (each rank its own shard, reloads only at
    # the same TP/PP/VPP/DP); this gathers it into model space instead, reloadable at any layout.
    dist_ckpt_optim_fully_reshardable: bool = False  # save the distributed optimizer for a layout change

    def check_save_writable(self) -> None:
        """Create ``save`` now and write a probe file in it: an unwritable directory is a
        one-line error at start, not a crash at the first save after hours of training."""
        import os
        from pathlib import Path

        root = Path(self.save)
        probe = root / f".write-test-{os.getpid()}"
        if root.exists() and not root.is_dir():
            raise ConfigError(f"checkpoint.save={self.save}: is a file, not a directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"checkpoint.save={self.save}: cannot write there "
                              f"({exc.strerror or exc})") from None

    def validate(self) -> None:
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError("checkpoint.save_interval must be >= 1")
        if self.keep_last_k is not None and self.keep_last_k < 1:
            raise ConfigError("checkpoint.keep_last_k must be >= 1")


@dataclasses.dataclass
class LoggingConfig:
    """Where metrics go: stdout always; TensorBoard and wandb when named."""

    log_interval: int = 10  # iterations between log lines
    tensorboard_dir: Optional[str] = None  # write TensorBoard events here
    wandb_project: Optional[str] = None  # log to this wandb project
    wandb_exp_name: Optional[str] = None  # the wandb run name
    wandb_save_dir: Optional[str] = None  # where wandb writes its files
    log_memory: bool = True  # add memory use (GiB) to each log line
    metrics_file: Optional[str] = None  # JSON lines of every logged record (full precision)

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ConfigError("logging.log_interval must be >= 1")


@dataclasses.dataclass
class TrainConfig:
    """Batch shape, length of the run and the safety nets."""

    task: str = "pretrain"  # pretrain | sft (a registered dataset provider)
    micro_batch_size: int = 1  # samples per forward on one rank
    global_batch_size: int = 8  # samples per optimizer step, all ranks
    train_iters: int = 100  # optimizer steps of the run
    eval_interval: Optional[int] = None  # None: no periodic validation
    eval_iters: int = 10  # validation batches per evaluation
    seed: int = 1234  # random seed (data order, init, dropout)
    max_skipped_iters_in_a_row: int = 10  # NaN/Inf loss or grad norm: skip, stop after this many
    exit_interval: Optional[int] = None  # stop (after saving) at an iteration multiple of this
    # every loss token weighs the same across micro-batches and data-parallel ranks (sum / count
    # of the global batch), instead of a mean of per-micro-batch means; what SFT's masked loss
    # wants, where micro-batches hold different numbers of assistant tokens (Megatron-LM's flag)
    calculate_per_token_loss: bool = False  # loss: token sum / token count of the global batch (SFT)

    def validate(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "train_iters", "eval_iters",
                     "max_skipped_iters_in_a_row"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of "
                f"--micro-batch-size {self.micro_batch_size}")


@dataclasses.dataclass
class PretrainConfig:
    """Pretraining (and SFT) on megatron-core: `pretrain_qwen.py --config examples/pretrain_tiny.yaml`."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sft: SFTDataArgs = dataclasses.field(default_factory=SFTDataArgs)  # read by --task sft
    memory: MemoryPlanConfig = dataclasses.field(default_factory=MemoryPlanConfig)

    def validate(self) -> None:
        self.parallel.check_model(self.model)
        if self.train.task == "pretrain" and not self.data.data_path:
            raise ConfigError("--data-path is required for --task pretrain")
        if self.train.task == "sft" and not self.sft.sft_data_path:
            raise ConfigError("--sft-data-path is required for --task sft")

    def compute_dtype(self, on_gpu: bool):
        """The dtype the model computes in: bf16 when asked for and on a GPU, else fp32 (a CPU
        run drops --bf16)."""
        import torch

        return torch.bfloat16 if self.optim.bf16 and on_gpu else torch.float32

    def packs_documents(self) -> bool:
        """Whether samples hold several documents kept apart: they carry ``cu_seqlens`` and go
        to the model as THD packed sequences (SFT, packed or padded; --reset-attention-mask)."""
        return self.train.task == "sft" or self.data.reset_attention_mask

    def attention_mask_source(self) -> Optional[str]:
        """The setting that makes the data carry an explicit attention mask, or None. None for
        every built-in task: separated documents go as cu_seqlens (model/varlen.py)."""
        return None

    def transformer_impl(self, on_gpu: bool, te_available: bool) -> str:
        """The layer implementation of this run (model/layer_spec.py): as the model alone would
        choose, and local where the data feeds an explicit attention mask. Packed documents go
        as THD to either implementation, but not split over context-parallel ranks (megatron-core
        splits a THD batch per CP rank only through TE's own partitioning, which we do not call)."""
        from megatron_qwen.model.layer_spec import choose_transformer_impl

        cp = self.parallel.context_parallel_size
        if cp > 1 and self.packs_documents():
            what = "train.task=sft" if self.train.task == "sft" else "data.reset_attention_mask=true"
            raise ConfigError(f"parallel.context_parallel_size={cp} with {what}: packed documents (THD) "
                              "are not split over context-parallel ranks; use context_parallel_size=1")
        return choose_transformer_impl(self.model, self.parallel, on_gpu, te_available,
                                       mask_from=self.attention_mask_source())

    def check_kernels(self, on_gpu: bool, flash_available: bool, te_available: bool = False) -> None:
        """Refuse at start what the attention kernel would refuse at the first forward, for the
        machine described by the arguments (pure: the GPU case is testable on CPU)."""
        from megatron_qwen.model.attention import check_attention_kernel

        self.transformer_impl(on_gpu, te_available)
        dtype = self.compute_dtype(on_gpu)
        dtype_from = ("no GPU: a CPU run computes in fp32" if self.optim.bf16 and not on_gpu
                      else f"optim.bf16={str(self.optim.bf16).lower()}")
        check_attention_kernel(self.model.attention_backend, dtype, "cuda" if on_gpu else "cpu",
                               flash_available, self.model.kv_channels,
                               mask_from=self.attention_mask_source(), dtype_from=dtype_from)

    def check_world(self, world_size: int) -> int:
        """Validate the layout against the process count; return the data-parallel size (the
        context-parallel ranks of a group share their samples, each taking a part of every
        sequence)."""
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        cp = self.parallel.context_parallel_size
        if world_size % (tp * pp * cp):
            what = f"tensor x pipeline x context parallel = {tp} x {pp} x {cp}" if cp > 1 else \
                f"tensor x pipeline parallel = {tp} x {pp}"
            raise ConfigError(f"world size {world_size} is not divisible by {what}")
        dp = world_size // (tp * pp * cp)
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.train.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.train.micro_batch_size} x data-parallel size {dp}")
        vpp = self.parallel.virtual_pipeline_model_parallel_size
        if vpp and vpp > 1 and (self.train.global_batch_size // per_step) % pp:
            raise ConfigError(
                f"the interleaved schedule needs the number of micro-batches "
                f"({self.train.global_batch_size // per_step}) to be a multiple of "
                f"--pipeline-model-parallel-size {pp}")
        return dp

    def num_microbatches(self, dp: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)
