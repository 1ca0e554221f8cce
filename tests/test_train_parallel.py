"""The trainer's parallel layouts and checkpoint resumption against a single-process run.

One single-process launch (tests/scripts/train_single.py), one 2-process and one 4-process gloo
launch (tests/scripts/train_parallel.py: TP2 x PP2, TP2 x DP2 with sequence parallelism) produce
per-iteration metrics; the tests compare them.
Tiny model (`tiny_vocab`: 4 layers, hidden 64, vocab 1000), seq 64, global batch 8, 20 steps, on
real English (Python's docs, Qwen-tokenized, ids folded into the toy vocabulary).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.dist import REPO, run_torchrun

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from train_common import losses, read_metrics, write_corpus  # noqa: E402

# FP32 on CPU: a different TP/DP layout only reorders sums (TP splits the matmuls, DP the
# gradient all-reduce), so curves agree to float rounding amplified over 20 Adam steps.
TOL = 1e-5  # relative, per iteration


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_parallel")
    data = str(out / "toy")
    write_corpus(data, vocab_size=1000)
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests/scripts/train_single.py"), str(out), data],
                          capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single_log = proc.stdout
    parallel_log = run_torchrun(REPO / "tests/scripts/train_parallel.py", str(out), data,
                                str(out / "init_ckpt"), str(out / "stop_ckpt"), timeout=900)
    parallel_log += run_torchrun(REPO / "tests/scripts/train_parallel.py", str(out), data,
                                 str(out / "init_ckpt"), str(out / "stop_ckpt"), nproc=4, timeout=900)
    return out, single_log, parallel_log


def _close(ref: dict, other: dict, what: str):
    assert other, f"{what}: no iterations logged"
    for it, loss in other.items():
        assert abs(loss - ref[it]) <= TOL * ref[it], f"{what}: iteration {it} loss {loss} vs single {ref[it]}"


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "pp2vpp2", "dp2overlap", "tp2pp2", "tp2dp2sp"])
def test_parallel_loss_curve_matches_single_process(runs, layout):
    out, _, _ = runs
    ref = losses(out / "ref.jsonl")
    other = losses(out / f"{layout}.jsonl")
    assert sorted(other) == list(range(1, 21))
    assert ref[20] < ref[1] - 0.2  # it learns, so the comparison is not between two flat lines
    _close(ref, other, layout)


def test_per_token_loss_on_two_data_parallel_ranks_matches_single_process(runs):
    # every pretraining token is a target, so the global token mean is the single-process loss;
    # the grad norm catches a wrong overall gradient scale, which Adam's steps would hide
    out, _, _ = runs
    ref, other = read_metrics(out / "ref.jsonl"), read_metrics(out / "dp2pertoken.jsonl")
    assert [r["iteration"] for r in other] == list(range(1, 21))
    for a, b in zip(ref, other):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=TOL), a["iteration"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["iteration"]


def test_resume_is_bitwise_identical_to_uninterrupted_run(runs):
    out, log, _ = runs
    assert "exiting at iteration 10 (--exit-interval 10) after saving" in log
    assert (out / "stop_ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    ref, stop, resumed = (read_metrics(out / f"{n}.jsonl") for n in ("ref", "stop", "resume"))
    assert [r["iteration"] for r in stop] == list(range(1, 11))
    assert [r["iteration"] for r in resumed] == list(range(11, 21))
    for a, b in zip(ref[10:], resumed):  # same loss, grad norm and LR to the last bit
        assert (a["lm_loss"], a["grad_norm"], a["lr"]) == (b["lm_loss"], b["grad_norm"], b["lr"])
    assert resumed[0]["consumed_samples"] == 11 * 8
    # --save-interval 4 and --keep-last-k 1: only the newest complete checkpoint is kept
    kept = sorted(p.name for p in (out / "resume_ckpt").iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000020"]
    assert (out / "resume_ckpt" / "iter_0000020" / "config.yaml").is_file()


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "tp2pp2"])
def test_resume_at_another_layout(runs, layout):
    out, _, log = runs
    ref = losses(out / "ref.jsonl")
    other = losses(out / f"resume_{layout}.jsonl")
    assert sorted(other) == list(range(11, 21))
    _close(ref, other, f"resume at {layout}")


def test_weights_only_checkpoint_starts_a_fresh_run(runs):
    """The converter's checkpoint (weights only) as --pretrained-checkpoint: iteration 0, fresh
    optimizer, the same curve as --finetune from the full checkpoint it was made from."""
    out, log, _ = runs
    assert f"loaded model weights from {out / 'weights_ckpt' / 'iter_0000000'} (weights only" in log
    ref, pre = read_metrics(out / "ref.jsonl"), read_metrics(out / "pretrained.jsonl")
    assert [r["iteration"] for r in pre] == [1, 2, 3]
    assert [r["lm_loss"] for r in pre] == [r["lm_loss"] for r in ref[:3]]
    # --pretrained-checkpoint only applies while --load is empty: a requeued job resumes its own
    assert (out / "pre_ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_non_finite_steps_are_skipped_then_training_stops(runs):
    out, log, _ = runs
    rows = read_metrics(out / "nan.jsonl")
    assert [r["skipped_iters"] for r in rows] == [0, 1, 2]
    stopped = [json.loads(line) for line in log.splitlines() if line.startswith('{"stopped"')]
    assert stopped and stopped[0]["stopped"] == "nan"
    assert "iteration 4: 3 iterations in a row had a NaN/Inf loss or grad norm" in stopped[0]["message"]
