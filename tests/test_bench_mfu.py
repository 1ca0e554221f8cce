"""bench/mfu.py on CPU at a tiny shape: both sides train the same model (same vocabulary rows,
so the same initial loss), the per-layer figure comes out, and without megatron-core (the bare
GPU machine) the peer line still prints and says why ours is skipped."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny_vocab", "--layers", "2", "--diff-layers", "1", "--seq-length", "32",
        "--micro-batch-size", "2", "--micro-batches", "2", "--steps", "1", "--warmup", "0"]
# tiny_vocab: 1000 ids padded to 1024 rows; a fresh model's loss is ~ln(rows) on both sides
FRESH_LOSS = math.log(1024)


def _bench(tmp_path, *prefix: str, args=()) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "mfu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEGATRON_QWEN_DEVICE": "cpu", "DS_ACCELERATOR": "cpu"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, *prefix, *TINY, *args, "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_ours_and_peer_train_the_same_shape_with_the_1p8b_recipe(tmp_path):
    proc, res = _bench(tmp_path, str(REPO / "bench" / "mfu.py"))
    ours, peer = res["sides"]
    lines = proc.stdout.splitlines()
    # the 1.8B recipe's optimizer at world 1 on gloo; CPU computes in fp32 on both sides
    assert any(ln.startswith("ours | megatron-core GPTModel, fp32, distributed optimizer (AdamW, clip 1.0), "
                             "attention sdpa") for ln in lines), proc.stdout
    assert any(ln.startswith("peer | transformers ") and "Qwen2ForCausalLM, sdpa, float32 weights, torch AdamW"
               in ln for ln in lines), proc.stdout
    for side in (ours, peer):
        assert abs(side["loss"] - FRESH_LOSS) < 0.05, side
        assert side["tokens_per_sec"] > 0 and side["mfu"] is None  # CPU: no peak, MFU n/a
        assert side["diff_layers"] == 1 and "layer_s" in side
    assert lines[-1].startswith("mfu summary | tiny_vocab 2 layers seq 32 | ours MFU n/a")


def test_without_megatron_core_the_peer_still_runs(tmp_path):
    hide = ("import runpy, sys; sys.modules['megatron'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc, res = _bench(tmp_path, "-c", hide, str(REPO / "bench" / "mfu.py"), args=("--peak-tflops", "1"))
    ours, peer = res["sides"]
    assert ours["skipped"].startswith("megatron-core is not importable") and "step_s" not in ours
    assert abs(peer["loss"] - FRESH_LOSS) < 0.05 and peer["mfu"] > 0  # the given peak makes an MFU
    assert "ours | skipped: megatron-core is not importable" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("mfu summary")
