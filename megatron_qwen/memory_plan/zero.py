"""What one DeepSpeed engine holds per GPU, by ZeRO stage (Rajbhandari et al. 2020, and the
buffers of DeepSpeed 0.19's stage 1/2 and stage 3 optimizers with the settings
``rlhf/deepspeed_config.py`` writes).

Per parameter, over N data-parallel ranks, e = 2 (bf16) or 4 (fp32) bytes:

    stage   parameters          gradients                 optimizer (fp32 master + 2 Adam moments)
    0       e                   e (backward to step)      8 (fp32) / 12 (bf16)
    1       e                   e + 4 / N (to the step)   12 / N
    2       e                   4 / N (fp32 partition)    12 / N
    3       e / N (+ small)     (e + 4) / N               12 / N

(measured on CPU in fp32, where e = 4: tests/test_memory_plan.py; the bf16 split is DeepSpeed's
documented one, unverified on GPU here.)

Stage 3 keeps parameters of at most ``stage3_param_persistence_threshold`` elements whole, and
gathers the others per module (at most a layer or the embedding, plus the prefetch bucket).
Gradient reduction goes through a bucket of at most ``reduce_bucket_size`` elements (at stage 3
sized to at most one partition by ``rlhf/deepspeed_config.py``). Offloading
moves the optimizer state (and its gradients) or the parameters to CPU: zero on the GPU.
"""

from __future__ import annotations

import dataclasses

from megatron_qwen.memory_plan.plan import Component
from megatron_qwen.memory_plan.shape import ModelShape
from megatron_qwen.rlhf.deepspeed_config import DEFAULT_REDUCE_BUCKET as REDUCE_BUCKET
from megatron_qwen.rlhf.deepspeed_config import zero3_buffer_sizes

# DeepSpeed's defaults where rlhf/deepspeed_config.py sets none, and the one it sets
PREFETCH_BUCKET = 50_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000
PERSISTENCE_THRESHOLD = 10_000


@dataclasses.dataclass
class Engine:
    """One DeepSpeed engine as the trainer builds it: ``ds_config`` is the JSON config
    ``rlhf/deepspeed_config.py`` generates for it (stage, offload, overlap, buckets)."""

    name: str  # actor, critic, ref, reward, reward model
    shape: ModelShape
    params: int  # total parameters of the module (backbone + head)
    ds_config: dict
    world: int
    on_gpu: bool = True
    field: str = "deepspeed."  # where the recipe sets this engine: "deepspeed." or "engines.actor_"

    @property
    def zero(self) -> dict:
        return self.ds_config["zero_optimization"]

    @property
    def zero_stage(self) -> int:
        return int(self.zero["stage"])

    @property
    def e(self) -> int:
        return 2 if self.ds_config["bf16"]["enabled"] and self.on_gpu else 4

    def reduce_bucket_default(self) -> int:
        """The reduce bucket when the config sets none: at ZeRO-3 the trainers size it from the
        model (``deepspeed_config.zero3_buffer_sizes``: at most one partition), else DeepSpeed's."""
        if self.zero_stage != 3:
            return REDUCE_BUCKET
        return zero3_buffer_sizes(self.params, self.world)["reduce_bucket_size"]

    def small_params(self) -> int:
        """Parameters ZeRO-3 keeps whole (at most the persistence threshold: norms, QKV biases,
        a scalar head)."""
        s = self.shape
        threshold = self.zero.get("stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD)
        small = [n for n in (s.hidden, (s.heads + 2 * s.kv_groups) * s.head_dim) if n <= threshold]
        per_layer = sum(small) + (s.hidden if s.hidden <= threshold else 0)  # 2 norms + bias
        head = s.hidden if self.params < s.total_params() else 0
        return s.layers * per_layer + (s.hidden if s.hidden <= threshold else 0) + head

    def gathered(self) -> int:
        """Elements ZeRO-3 holds gathered while computing: the largest module (a layer or the
        embedding) plus the prefetch bucket, capped by max_live_parameters and the model."""
        s = self.shape
        return min(self.params, self.zero.get("stage3_max_live_parameters", MAX_LIVE_PARAMETERS),
                   max(s.layer_params(), s.embedding_params())
                   + self.zero.get("stage3_prefetch_bucket_size", PREFETCH_BUCKET))

    def components(self, train: bool) -> list:
        n, e, P, z = self.world, self.e, self.params, self.zero_stage
        who = self.name
        offload_param = self.zero.get("offload_param") is not None
        offload_opt = self.zero.get("offload_optimizer") is not None
        f = self.field
        fix_stage = (f"offload {who}'s parameters ({f}offload_param) or add GPUs" if z == 3
                     else f"raise {who}'s ZeRO stage to 3 ({f}zero_stage)")
        fix_opt = (f"offload {who}'s optimizer ({f}offload_optimizer) or add GPUs" if z >= 1
                   else f"raise {who}'s ZeRO stage ({f}zero_stage)")
        out = []
        if offload_param:
            params, how = 0, "offloaded to CPU"
        elif z == 3:
            small = self.small_params()
            params = ((P - small) / n + small) * e
            how = f"{P / 1e9:.3f}B x {e} B / {n} ranks (ZeRO-3; {small} small params whole)"
        else:
            params, how = P * e, f"{P / 1e9:.3f}B x {e} B"
        out.append(Component(f"{who} parameters", params, how, fix_stage))
        if not train:
            return out
        if offload_opt:
            grads, ghow = (P * e if z < 2 else 0), "partition on CPU (offload_optimizer)"
        elif z == 3:  # the reduced partition, and its fp32 flat copy the step reads
            grads, ghow = P * (e + 4) / n, f"partition ({e} B) + its fp32 copy / {n} ranks"
        elif z == 2:
            grads, ghow = P * 4 / n, f"fp32 partition / {n} ranks"
        else:  # stage 0/1: whole .grad tensors, made in backward as the activations are freed
            grads, ghow = P * e, "whole, from backward to the step" + (
                f" (+ the fp32 partition / {n} ranks)" if z == 1 else "")
            if z == 1:
                grads += P * 4 / n
        out.append(Component(f"{who} gradients", grads, ghow,
                             fix_opt if z >= 2 else f"raise {who}'s ZeRO stage to 2 ({f}zero_stage)",
                             phase=f"{who} step" if z < 2 and not offload_opt else None))
        if offload_opt:
            opt, ohow = 0, "offloaded to CPU (DeepSpeedCPUAdam)"
        elif z == 0:
            per = 8 if e == 4 else 12
            opt, ohow = P * per, f"Adam {per} B/param, not sharded (ZeRO-0)"
        else:
            opt, ohow = P * 12 / n, f"fp32 master + Adam 12 B/param / {n} ranks"
        out.append(Component(f"{who} optimizer state", opt, ohow, fix_opt))
        bucket = int(self.zero.get("reduce_bucket_size", self.reduce_bucket_default()))
        if z >= 1:  # contiguous_gradients (on by default): reduce buckets, allocated whole
            count = 2 if (z < 3 and self.zero.get("overlap_comm")) else 1
            out.append(Component(f"{who} gradient bucket", count * bucket * e,
                                 f"{count} x reduce_bucket_size {bucket / 1e6:.0f}M elements x {e} B",
                                 "lower zero_optimization.reduce_bucket_size"))
        if z == 0 and not offload_opt:
            # the ZeRO-0 step: gradients flattened into all-reduce buckets, then torch's AdamW
            # makes two temporaries of each parameter it steps (the largest: the embedding)
            largest = max(self.shape.embedding_params(), self.shape.layer_params() // 3)
            out.append(Component(f"{who} step buffers", max(2 * 4 * largest, min(bucket, P) * e),
                                 "largest of: flattened gradients for the all-reduce, AdamW's two "
                                 "temporaries of the largest parameter", fix_opt,
                                 phase=f"{who} step"))
        return out

    def gather_bytes(self, backward: bool = False) -> float:
        """Parameters gathered while this engine computes (ZeRO-3 only; else 0); in backward
        also the largest parameter's whole gradient and its copy into the reduce-scatter."""
        if self.zero_stage != 3:
            return 0.0
        largest = max(self.shape.embedding_params(), self.shape.layer_params() // 3)
        return (self.gathered() + (2 * largest if backward else 0)) * self.e
