"""Which megatron-core fusion flags are on: each only where its kernel exists here, decided once.

megatron-core (0.16.1) takes six fusion flags from the TransformerConfig and fails late, or not at
all, when a kernel is missing: ``gradient_accumulation_fusion`` raises in ColumnParallelLinear's
constructor without ``fused_weight_gradient_mlp_cuda``; ``apply_rope_fusion`` raises in
``TransformerConfig.__post_init__`` when ``rope_utils.fused_apply_rotary_pos_emb`` (Transformer
Engine's) is None; ``masked_softmax_fusion`` imports ``scaled_masked_softmax_cuda`` inside the
forward; the bias-activation and bias-dropout fusions are ``megatron.core.jit.jit_fuser``
functions, which is ``torch.compile`` on torch >= 2.2 and needs Triton to compile on CUDA.
``decide_fusions`` probes exactly those (a real import, not a file lookup: an extension that is
installed but does not load counts as missing) and returns every flag with its reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

FLAGS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
         "apply_rope_fusion", "gradient_accumulation_fusion", "persist_layer_norm")

# The import each kernel needs, as megatron-core 0.16.1 imports it.
GRAD_ACCUM_MODULE = "fused_weight_gradient_mlp_cuda"  # tensor_parallel/layers.py
SOFTMAX_MODULE = "scaled_masked_softmax_cuda"  # fusions/fused_softmax.py
TRITON_MODULE = "triton"  # what torch.compile's CUDA backend generates kernels with


@dataclass(frozen=True)
class Fusion:
    on: bool
    reason: str


# --- availability probes (the only things a test may fake) ---------------------------------

def cuda_available() -> bool:
    return torch.cuda.is_available()


def importable(module: str) -> bool:
    """The module really imports (an extension whose shared library fails to load does not)."""
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or OSError / RuntimeError from a broken CUDA extension
        return False
    return True


def fused_rope_available() -> bool:
    """megatron-core's own test (transformer_config.py): its rope_utils found TE's fused RoPE."""
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def jit_fuser_needs_triton() -> bool:
    """megatron-core's jit_fuser is torch.compile (torch >= 2.2), which compiles CUDA kernels with
    Triton; the older torch.jit.script fuser needs nothing more than CUDA."""
    from megatron.core import jit

    return jit.jit_fuser is torch.compile


# --- the decision ----------------------------------------------------------------------------

def decide_fusions(normalization: str = "RMSNorm") -> dict[str, Fusion]:
    """Every flag of FLAGS, on only where its kernel is present on this device, with the reason."""
    if not cuda_available():
        return {flag: Fusion(False, "no CUDA device") for flag in FLAGS}
    if jit_fuser_needs_triton() and not importable(TRITON_MODULE):
        jit = Fusion(False, "megatron-core's jit_fuser is torch.compile and triton is not importable")
    else:
        jit = Fusion(True, "jit_fuser kernel on CUDA")
    grad = (Fusion(True, f"{GRAD_ACCUM_MODULE} imports") if importable(GRAD_ACCUM_MODULE)
            else Fusion(False, f"{GRAD_ACCUM_MODULE} (Apex --cuda_ext) is not importable"))
    softmax = (Fusion(True, f"{SOFTMAX_MODULE} imports") if importable(SOFTMAX_MODULE)
               else Fusion(False, f"{SOFTMAX_MODULE} (Megatron's / Apex's softmax extension) is not importable"))
    rope = (Fusion(True, "Transformer Engine's fused RoPE found by megatron-core") if fused_rope_available()
            else Fusion(False, "megatron-core found no fused RoPE (Transformer Engine >= 1.4)"))
    # megatron-core reads persist_layer_norm only in Apex's FusedLayerNorm, which is LayerNorm only
    persist = Fusion(False, f"only Apex's FusedLayerNorm reads it, and the model uses {normalization}")
    return {"bias_activation_fusion": jit, "bias_dropout_fusion": jit, "masked_softmax_fusion": softmax,
            "apply_rope_fusion": rope, "gradient_accumulation_fusion": grad, "persist_layer_norm": persist}


def describe(fusions: dict[str, Fusion]) -> str:
    """One line: every flag, on or off, and why."""
    return "fusions: " + "; ".join(f"{flag}={'on' if f.on else 'off'} ({f.reason})"
                                   for flag, f in fusions.items())


_logged: set[str] = set()


def log_once(fusions: dict[str, Fusion]) -> None:
    """Print the decision once per process (on global rank 0 in a distributed run)."""
    line = describe(fusions)
    if line in _logged:
        return
    _logged.add(line)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(line, flush=True)
