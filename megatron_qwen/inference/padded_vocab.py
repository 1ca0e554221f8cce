"""Token NLL with the padded vocabulary rows left out of the softmax.

The embedding and output layer are padded to a multiple of 128 x TP rows (``hf-to-mcore --tp 2``
pads Qwen's 151,936 rows to 152,064 with zeros). megatron-core's loss takes the softmax over every
row, so each zero row adds exp(0) to the normaliser and a model evaluated at TP=2 reads a higher
perplexity than the same weights at TP=1 or in transformers. Here the padded rows' logits are
-inf before megatron-core's vocab-parallel cross entropy: the result depends on the real
vocabulary only. (Generation masks the same rows: ``generation.generate(vocab_size=...)``.)
"""

from __future__ import annotations

import torch


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Float16Module / DDP wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def mask_padded_rows(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """This TP rank's logits [..., V / TP] with the columns of rows >= ``vocab_size`` at -inf."""
    from megatron.core import parallel_state as ps

    width = local_logits.size(-1)
    start = ps.get_tensor_model_parallel_rank() * width if ps.model_parallel_is_initialized() else 0
    cut = min(max(vocab_size - start, 0), width)
    if cut < width:
        local_logits = local_logits.clone()
        local_logits[..., cut:] = float("-inf")
    return local_logits


def token_nll(local_logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token NLL [b, s] from this rank's logits [b, s, V / TP] over the real vocabulary."""
    from megatron.core import tensor_parallel

    logits = mask_padded_rows(local_logits.float(), vocab_size).transpose(0, 1).contiguous()
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1)
