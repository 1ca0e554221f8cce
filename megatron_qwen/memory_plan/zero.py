"""What one DeepSpeed engine holds per GPU, by ZeRO stage (Rajbhandari et al. 2020, and the
buffers of DeepSpeed 0.19's stage 1/2 and stage 3 optimizers with the settings
``rlhf/deepspeed_config.py`` writes).

Per parameter, over N data-parallel ranks, e = 2 (bf16) or 4 (fp32) bytes:

    stage   parameters          gradients            optimizer (fp32 master + 2 Adam moments)
    0       e                   e                    8 (fp32) / 12 (bf16)
    1       e                   e                    12 / N
    2       e                   e / N                12 / N
    3       e / N (+ small)     4 / N (fp32)         12 / N

Stage 3 keeps parameters of at most ``stage3_param_persistence_threshold`` elements whole, and
gathers the others per module (at most a layer or the embedding, plus the prefetch bucket).
Gradient reduction goes through a bucket of at most ``reduce_bucket_size`` elements. Offloading
moves the optimizer state (and its gradients) or the parameters to CPU: zero on the GPU.
"""

from __future__ import annotations

import dataclasses

from megatron_qwen.memory_plan.plan import Component
from megatron_qwen.memory_plan.shape import ModelShape

# DeepSpeed's defaults where rlhf/deepspeed_config.py sets none, and the one it sets
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000
PERSISTENCE_THRESHOLD = 10_000


@dataclasses.dataclass
class Engine:
    """One DeepSpeed engine of a recipe: ``name`` (actor, critic, ref, reward, reward model)."""

    name: str
    shape: ModelShape
    params: int  # total parameters of the module (backbone + head)
    zero_stage: int
    train: bool
    e: int  # bytes per compute-dtype element
    world: int
    offload_optimizer: bool = False
    offload_param: bool = False

    def small_params(self) -> int:
        """Parameters DeepSpeed ZeRO-3 keeps whole (norms, QKV biases, a scalar head)."""
        s = self.shape
        per = s.small_params_per_layer()
        return s.layers * per + s.hidden + (s.hidden + 1 if self.params < s.total_params() else 0)

    def largest_gather(self) -> int:
        """Elements stage 3 holds gathered at once: the largest module (a layer or the
        embedding) plus the prefetch bucket, capped by max_live_parameters and the model."""
        s = self.shape
        return min(self.params, MAX_LIVE_PARAMETERS,
                   max(s.layer_params(), s.embedding_params()) + PREFETCH_BUCKET)

    def components(self) -> list:
        n, e, P, z = self.world, self.e, self.params, self.zero_stage
        who = self.name
        fix_stage = f"raise {who}'s ZeRO stage" + (" or offload its parameters" if z == 3 else "")
        out = []
        if self.offload_param:
            params, how = 0, "offloaded to CPU"
        elif z == 3:
            small = self.small_params()
            params = ((P - small) / n + small) * e
            how = f"{P / 1e9:.3f}B x {e} B / {n} ranks (ZeRO-3; {small} small params whole)"
        else:
            params, how = P * e, f"{P / 1e9:.3f}B x {e} B"
        out.append(Component(f"{who} parameters", params, how, fix_stage))
        if self.train:
            if self.offload_optimizer:
                grads, ghow = (P * e if z < 2 else 0), "partition on CPU (offload_optimizer)"
            elif z == 3:
                grads, ghow = P * 4 / n, f"fp32 partition / {n} ranks"
            elif z == 2:
                grads, ghow = P * e / n, f"partition / {n} ranks"
            else:
                grads, ghow = P * e, "whole"
            out.append(Component(f"{who} gradients", grads, ghow,
                                 f"raise {who}'s ZeRO stage to 2 or 3"))
            if self.offload_optimizer:
                opt, ohow = 0, "offloaded to CPU (DeepSpeedCPUAdam)"
            elif z == 0:
                per = 8 if e == 4 else 12
                opt, ohow = P * per, f"Adam {per} B/param, not sharded (ZeRO-0)"
            else:
                opt, ohow = P * 12 / n, f"fp32 master + Adam 12 B/param / {n} ranks"
            out.append(Component(f"{who} optimizer state", opt, ohow,
                                 f"raise {who}'s ZeRO stage, or set {who} offload_optimizer"))
            if z >= 1:  # contiguous_gradients (on by default): one reduce bucket, allocated whole
                out.append(Component(f"{who} gradient bucket", REDUCE_BUCKET * e,
                                     f"reduce_bucket_size {REDUCE_BUCKET / 1e6:.0f}M elements x {e} B",
                                     "lower zero_optimization.reduce_bucket_size"))
            else:  # stage 0/1 flatten the gradients into buckets after backward
                bucket = min(REDUCE_BUCKET, P)
                out.append(Component(f"{who} gradient bucket", bucket * e,
                                     f"flattened gradients, at most {REDUCE_BUCKET / 1e6:.0f}M elements",
                                     f"raise {who}'s ZeRO stage", phase="gradient reduction"))
        return out

    def gather_bytes(self) -> float:
        """Parameters gathered while this engine computes (ZeRO-3 only; else 0)."""
        if self.zero_stage != 3:
            return 0.0
        return self.largest_gather() * self.e
