"""The parallel layouts on 2 gloo processes against transformers' Qwen2ForCausalLM.

One torchrun launch (tests/scripts/model_parallel.py) checks, per layout, the logits (<= 1e-4),
and one megatron-core DDP + Adam step: loss, gradient norm and every updated weight against
torch AdamW on the HF model (tolerances in the script's docstring); then torch_dist checkpoints
(model + optimizer) reload bit-exactly and reshard across layouts."""

from pathlib import Path

import pytest

from tests.dist import run_torchrun

SCRIPT = Path(__file__).parent / "scripts" / "model_parallel.py"
CHECKS = [
    "dp2",                  # TP=1, DP=2, megatron DDP with overlapped bucketed grad reduce
    "tp2",                  # TP=2 (+ torch_dist save/reload of model and optimizer)
    "tp2_sp",               # TP=2 with sequence parallelism (RMSNorm grads all-reduced)
    "pp2",                  # PP=2, 1F1B schedule
    "pp2_vpp2",             # PP=2 x 2 virtual stages, interleaved schedule (+ reload)
    "dp2_distopt",          # DP=2, distributed optimizer (+ reload)
    "dp2_distopt_overlap",  # ... with overlapped grad reduce-scatter and param all-gather
    "reshard:tp2:pp2",      # a TP=2 checkpoint loaded at PP=2
    "reshard:pp2_vpp2:tp2_sp",
    "count:tp2",            # count_parameters inside a TP=2 run equals the HF model's
    "count:pp2",
]


@pytest.mark.timeout(900)
def test_parallel_layouts_match_single_device_reference(tmp_path):
    out = run_torchrun(SCRIPT, *CHECKS, env={"MODEL_CKPT_DIR": str(tmp_path)})
    for check in CHECKS:
        assert f"OK {check} " in out, f"no result for {check}:\n{out[-3000:]}"
    for check in ("tp2", "pp2_vpp2", "dp2_distopt"):
        assert f"OK {check} checkpoint roundtrip" in out
