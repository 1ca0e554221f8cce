"""Worker for tests/test_varlen.py under torchrun with 2 gloo processes: packed THD sequences in
the parallel layouts named on the command line (tp2_sp: TP=2 with sequence parallelism, pp2).

The weights are a random transformers Qwen2ForCausalLM's; the reference is that model run on
every document alone (single device, plain PyTorch). Per layout, one forward/backward through
megatron-core's schedule with megatron DDP: the loss (rel 1e-6) and every gradient of this rank's
shards (after the schedule's grad finalisation: sequence-parallel norm all-reduce) within 1e-5 of
the largest reference gradient, for the THD path and for the dense block-mask path. Prints
"OK <layout>" per layout.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from model_common import full_mcore_state, hf_reference, local_shards, unwrap  # noqa: E402
from model_parallel import setup  # noqa: E402
from varlen_common import SEQ, dense_masks, documents, masked_mean, packed_batch  # noqa: E402

from megatron_qwen.config import load_model_config  # noqa: E402
from megatron_qwen.model import varlen  # noqa: E402
from megatron_qwen.runtime import destroy  # noqa: E402

LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5


def reference(hf, batch):
    """(loss, grad-valued copy of the HF model): every document alone, the batch's masked mean."""
    hf = copy.deepcopy(hf)
    total = 0.0
    for row, a, b in documents(batch):
        logits = hf(batch["tokens"][row:row + 1, a:b]).logits[0]
        ce = torch.nn.functional.cross_entropy(logits, batch["labels"][row, a:b], reduction="none")
        total = total + (ce * batch["loss_mask"][row, a:b]).sum()
    loss = total / batch["loss_mask"].sum()
    loss.backward()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.grad)
    return loss.item(), hf


def step(model, batch, thd: bool):
    """One forward/backward of the micro-batch; returns the loss (last stage) or None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        if thd:
            flat, packed = varlen.thd_micro_batch(b)
            out = chunk(flat["tokens"], flat["position_ids"], None, labels=flat["labels"],
                        packed_seq_params=packed)
            loss_mask = flat["loss_mask"]
        else:
            out = chunk(b["tokens"], b["position_ids"], dense_masks(b), labels=b["labels"])
            loss_mask = b["loss_mask"]

        def loss_func(per_token):
            loss = masked_mean(per_token, loss_mask)
            return loss, {"loss": loss.detach().clone()}
        return out, loss_func

    for m in model:
        m.train()
        m.zero_grad_buffer()
    b, s = batch["tokens"].shape
    shape = dict(seq_length=b * s, micro_batch_size=1) if thd else dict(seq_length=s, micro_batch_size=b)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter([batch]) for _ in model], model=model,
        num_microbatches=1, forward_only=False, **shape)
    return losses[0]["loss"].item() if ps.is_pipeline_last_stage(ignore_virtual=True) else None


def check_layout(name: str, model_cfg, hf, batch, ref_loss, ref_grads) -> None:
    parallel_cfg, model, _ = setup(name, model_cfg, hf)
    expected = local_shards(full_mcore_state(ref_grads, model_cfg, parallel_cfg.tensor_model_parallel_size),
                            model_cfg, parallel_cfg)
    scale = max(g.abs().max().item() for g in expected.values())
    for path, thd in (("thd", True), ("dense", False)):
        loss = step(model, batch, thd)
        if loss is not None:
            assert abs(loss - ref_loss) <= LOSS_RTOL * ref_loss, f"{name} {path}: loss {loss} vs {ref_loss}"
        worst = max((p.main_grad - expected[n]).abs().max().item() for n, p in unwrap(model[0]).named_parameters())
        assert worst <= GRAD_RTOL * scale, f"{name} {path}: gradients differ by {worst} (largest {scale})"
        print(f"{name} {path}: loss={loss} max_grad_diff={worst:.2e} of {scale:.2e}", flush=True)
    print(f"OK {name} ", flush=True)


def main() -> None:
    model_cfg = load_model_config("tiny_vocab")
    hf = hf_reference(model_cfg, seed=0)
    batch = packed_batch(model_cfg.vocab_size)
    assert batch["tokens"].numel() == 2 * SEQ
    ref_loss, ref_grads = reference(hf, batch)
    for name in sys.argv[1:]:
        check_layout(name, model_cfg, hf, batch, ref_loss, ref_grads)
    destroy()


if __name__ == "__main__":
    main()
