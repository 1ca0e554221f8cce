"""Throughput, model FLOPs and MFU, and the sinks metrics go to (stdout, TensorBoard, wandb).

Model FLOPs per token follow Megatron-LM's ``num_floating_point_operations`` (what people
compare MFU with): ``6 * N + 6 * L * q * s``. N counts every matmul weight that touches each
token (all transformer layers plus the output projection; not the input embedding, a lookup);
``6 * L * q * s`` is attention's QK^T and AV at context s (q = heads x head size) for forward +
backward, halved for the causal mask (only the lower triangle is needed). PaLM's convention,
``12 * L * h * s``, counts the full square. For a multi-head model with a SwiGLU of 8h/3 this is
the Megatron paper's ``72 B s L h^2 (1 + s/(12 h) + V/(12 L h))`` per batch of B sequences (its
``s/(6 h)`` halved for causality). Recomputation is not in MFU (model FLOPs, not hardware FLOPs);
``recompute_flops_per_token`` gives what it adds, for the hardware figure (full recompute: 96
instead of 72, head excluded).
"""

from __future__ import annotations

import math
import os
import resource
from typing import Optional

import torch

# Dense BF16 peak per GPU in TFLOP/s (vendor datasheets, without sparsity); first match wins.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0))


# named in the log line and by bench/mfu.py, so a reader knows which count the MFU uses
FLOPS_CONVENTION = "Megatron-LM causal FLOPs"


def _query_size(model_cfg) -> int:
    return model_cfg.num_attention_heads * model_cfg.kv_channels


def layer_matmul_params(model_cfg) -> int:
    """Weights of one transformer layer a token goes through: QKV (GQA: the K and V groups),
    the output projection and SwiGLU's three matrices."""
    h, ffn = model_cfg.hidden_size, model_cfg.ffn_hidden_size
    q = _query_size(model_cfg)
    kv = (model_cfg.num_query_groups or model_cfg.num_attention_heads) * model_cfg.kv_channels
    return h * (q + 2 * kv) + q * h + 3 * h * ffn


def matmul_params(model_cfg, tp: int = 1) -> int:
    """N of the FLOPs formula: weights of every layer plus the (padded) output projection."""
    head = model_cfg.vocab_size_padded(tp) * model_cfg.hidden_size
    return model_cfg.num_layers * layer_matmul_params(model_cfg) + head


def layer_flops_per_token(model_cfg, seq_length: Optional[int] = None) -> float:
    """Training FLOPs per token of one transformer layer: 3 GEMMs (forward, data and weight
    gradients) x 2 FLOPs per multiply-add over its weights, plus causal attention at context s."""
    s = seq_length or model_cfg.seq_length
    return 6.0 * layer_matmul_params(model_cfg) + 6.0 * _query_size(model_cfg) * s


def head_flops_per_token(model_cfg) -> float:
    """Training FLOPs per token of the output projection (the padded vocabulary rows)."""
    return 6.0 * model_cfg.vocab_size_padded(1) * model_cfg.hidden_size


def flops_per_token(model_cfg, seq_length: Optional[int] = None) -> float:
    """Training (forward + backward) model FLOPs per token, Megatron-LM's causal convention."""
    layers = model_cfg.num_layers * layer_flops_per_token(model_cfg, seq_length)
    return layers + head_flops_per_token(model_cfg)


def recompute_flops_per_token(model_cfg, seq_length: Optional[int] = None) -> float:
    """FLOPs per token that activation recomputation adds (hardware FLOPs, not in MFU): ``full``
    runs every layer's forward again (a third of its training FLOPs), ``selective`` runs core
    attention's forward again (QK^T and AV, causal: 2 q s per layer)."""
    s = seq_length or model_cfg.seq_length
    if model_cfg.recompute_granularity == "full":
        return model_cfg.num_layers * layer_flops_per_token(model_cfg, s) / 3.0
    if model_cfg.recompute_granularity == "selective":
        return model_cfg.num_layers * 2.0 * _query_size(model_cfg) * s
    return 0.0


def peak_tflops(device_name: Optional[str] = None) -> Optional[float]:
    """Dense BF16 peak of the detected GPU, or None (CPU, unknown GPU: MFU is n/a)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


def throughput(model_cfg, tokens: int, seconds: float, num_gpus: int,
               peak: Optional[float] = None) -> dict:
    """tokens/s (whole job), TFLOP/s per GPU and MFU (None when the peak is unknown)."""
    tflops = flops_per_token(model_cfg) * tokens / seconds / num_gpus / 1e12
    return {"tokens_per_sec": tokens / seconds, "tflops_per_gpu": tflops,
            "mfu": tflops / peak if peak else None}


def memory_gib() -> dict:
    if torch.cuda.is_available():
        return {"mem_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsWriter:
    """Writes scalars to stdout and, when configured, TensorBoard and wandb (one rank only)."""

    def __init__(self, logging_cfg, full_config: dict, enabled: bool):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        if logging_cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=logging_cfg.tensorboard_dir)
        if logging_cfg.wandb_project:
            import wandb

            # offline unless the user configured wandb (API key or WANDB_MODE)
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=logging_cfg.wandb_project, name=logging_cfg.wandb_exp_name,
                                    dir=logging_cfg.wandb_save_dir or logging_cfg.tensorboard_dir,
                                    config=full_config, mode=mode)

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None and not isinstance(v, str)}
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in clean.items()}, step=step)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_train_line(iteration: int, train_iters: int, m: dict) -> str:
    mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
    mem = " | ".join(f"{k} {v:.2f}" for k, v in m.items() if k.startswith(("mem_", "max_rss")))
    return (f"iteration {iteration:>7d}/{train_iters} | lm loss {m['lm_loss']:.6E} | "
            f"grad norm {m['grad_norm']:.4f} | lr {m['lr']:.4E} | "
            f"tokens/s {m['tokens_per_sec']:.1f} | TFLOP/s/GPU {m['tflops_per_gpu']:.2f} | "
            f"MFU {mfu} ({FLOPS_CONVENTION}) | "
            f"skipped {m['skipped_iters']:d} | {mem}")


def is_finite(x: float) -> bool:
    return x is not None and math.isfinite(x)
