"""Activation bytes of one decoder layer and of the logits, per token, for both model codes.

Counted tensor by tensor from what autograd saves for backward (megatron-core's layers with our
RMSNorm and core attention; transformers' Qwen2 with SDPA), in the compute dtype of ``e`` bytes:

    layer input (the residual)                 h
    RMSNorm x2: fp32 copy of the input (bf16)  4h/e ; the normalised x and weight * x: 2h each
    attention: q, k, v (k, v repeated to the query heads when grouped), output, its
               [s, b, h] copy for the projection; log-sum-exp (fp32, per head)
    residual after attention                   h
    SwiGLU MLP: gate|up output 2f, silu(gate) f, product f
    dropout masks (1 byte each) where the recipe's dropout is on

Sequence parallelism divides the [s, b, h] tensors by TP; TP divides the head and MLP tensors.
"""

from __future__ import annotations

from megatron_qwen.memory_plan.shape import ModelShape


def norm_bytes(hidden: float, e: int) -> float:
    """RMSNorm's saved tensors (fp32 input copy under bf16, normalised x, weight * x)."""
    return hidden * ((4 if e != 4 else 0) + 2 * e)


def layer_bytes_per_token(shape: ModelShape, e: int, tp: int = 1, sp: bool = False,
                          recompute: str | None = None, dropout: bool = False,
                          unfused_seq: int = 0) -> float:
    """Bytes saved by one layer per token. ``recompute="selective"`` drops what the core attention
    saves beyond its inputs; ``unfused_seq`` (the sequence length) adds the unfused attention's
    [s, s] scores per head."""
    h, f, d = shape.hidden, shape.ffn, shape.head_dim
    a, g = shape.heads / tp, shape.kv_groups / tp
    r = h / tp if sp else h  # the [s, b, h] tensors outside the TP region
    kv = 2 * a * d if a != g else 2 * g * d + a * d  # repeated copies, or views of the fused QKV
    attn = e * (a * d + kv + h / tp) + 4 * a  # q, k/v, projection input copy, lse
    if recompute != "selective":
        attn += e * a * d  # the attention output SDPA keeps for its backward
        if unfused_seq:
            attn += unfused_seq * a * (4 + (e if e != 4 else 0))
    mlp = e * 4 * f / tp
    total = 2 * e * r + 2 * norm_bytes(r, e) + attn + mlp
    if dropout:
        total += 2 * r  # hidden dropout masks
    return total


def logits_bytes_per_token(vocab_per_rank: float, e: int, in_place_softmax: bool) -> float:
    """The logits at the loss: the model's output (e), its fp32 copy (under bf16), and the fp32
    (log-)softmax kept for backward: megatron-core's vocab-parallel cross entropy computes it in
    place in the fp32 logits, transformers' users (``log_softmax(logits.float())``) in a new one."""
    return vocab_per_rank * (e + (4 if e != 4 else 0) + (0 if in_place_softmax else 4))
