"""Reward-model training end to end on CPU: real text, real tokenizer, real DeepSpeed engines.

Pairs: chosen = a sentence of the Python language reference, rejected = the same words
shuffled. A tiny random Qwen2 (real 151,936-row vocabulary) trains 40 steps (2 epochs of 640
pairs, batch 32) through ``tools/train_reward_model.py``'s entry point, in one process (ZeRO-0,
and ZeRO-1, whose engine reports the grad norm) and in two processes under ZeRO-2 and ZeRO-3;
the ZeRO-3 run also saves half-way and a second run resumes from there. A short 2-process ZeRO-2
run with attention dropout on saves at step 3 and is resumed: the resumed steps must repeat the
uninterrupted ones bit for bit (each rank's RNG states are part of the checkpoint).

One process and two compute the same function of the same numbers; only the order of the fp32
sums differs (ZeRO's partitions, the data-parallel all-reduce). So the first step agrees to
fp32 rounding: loss within 1e-6, grad norm within 1e-5 relative. Adam then carries the rounding
forward and it grows about tenfold every three steps (measured at ZeRO-3: 3e-5 relative in the
grad norm by step 5, 2e-3 in the loss by step 30), so the first 5 steps are held to 1e-3 relative
in the grad norm and 1e-4 in the loss, and the chaotic rest of the curve to 0.005 (steps <= 30)
and 0.05. The grad norm sees a gradient-scale error at the first step (a doubled gradient reads
1.0 relative), before any loss can: Adam's update is nearly blind to the scale, so the loss
curve shows it only later, through clipping.
"""

import json
import math
import sys
from pathlib import Path

import pytest

from megatron_qwen.rlhf import hf_model
from megatron_qwen.rlhf.reward_scoring import main as score_main
from tests.dist import run_torchrun

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import rm_fixtures  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "rm_train_check.py"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    train, test = rm_fixtures.make_pairs(root / "data", n_train=640, n_test=96)
    model = rm_fixtures.make_tiny_qwen2(root / "model")
    dropout_model = rm_fixtures.with_attention_dropout(model, root / "model_dropout", 0.1)
    run_torchrun(SCRIPT, root / "data", model, root / "w1", "0,1", nproc=1)
    run_torchrun(SCRIPT, root / "data", model, root / "w2", "2,3", "--resume",
                 "--dropout-model", dropout_model, nproc=2)
    one = json.loads((root / "w1" / "results_w1.json").read_text())
    two = json.loads((root / "w2" / "results_w2.json").read_text())
    return {"root": root, "test": test, "zero0": one["zero0"], "zero1": one["zero1"], "zero2": two["zero2"],
            "zero3": two["zero3"], "resume": two["resume"], "dropout": two["dropout"]}


def test_reward_model_learns_real_text(runs):
    for layout in ("zero0", "zero2", "zero3"):
        final = runs[layout]["final"]
        assert final["count"] == 96
        assert final["accuracy"] >= 0.9, (layout, final)
        losses = runs[layout]["losses"]
        assert len(losses) == 40 and abs(losses[0] - math.log(2)) < 0.05
        assert sum(losses[-5:]) / 5 < 0.2, (layout, losses)


def test_bad_pairs_are_skipped_and_counted(runs):
    report = runs["zero0"]["train_data"]
    assert report["pairs"] == 640 and report["skipped"] == 3
    assert report["skipped_by_reason"] == {r: 1 for r in rm_fixtures.BAD_LINES.values()}
    for line, reason in rm_fixtures.BAD_LINES.items():
        assert any(f"pairs_train.jsonl:{line}: {reason}" in p for p in report["skipped_places"][reason])


@pytest.mark.parametrize("layout", ["zero2", "zero3"])
def test_two_processes_match_one(runs, layout):
    ref, got = runs["zero1"], runs[layout]
    assert runs["zero0"]["losses"][:5] == pytest.approx(ref["losses"][:5], abs=1e-6)
    diffs = [abs(a - b) for a, b in zip(ref["losses"], got["losses"])]
    norms = [abs(a - b) / a for a, b in zip(ref["grad_norms"], got["grad_norms"])]
    assert diffs[0] <= 1e-6 and norms[0] <= 1e-5, (diffs[0], norms[0])
    assert max(diffs[:5]) <= 1e-4 and max(norms[:5]) <= 1e-3, (diffs[:5], norms[:5])
    assert max(diffs[:30]) < 0.005, diffs
    assert max(diffs) < 0.05, diffs
    assert abs(ref["final"]["accuracy"] - got["final"]["accuracy"]) <= 0.035


def test_resume_continues_the_run(runs):
    res = runs["resume"]
    assert res["half"] == 20
    full, resumed = runs["zero3"], res["resumed"]
    assert len(resumed["losses"]) == 20
    assert resumed["losses"] == pytest.approx(full["losses"][20:], abs=1e-6)
    assert resumed["final"]["accuracy"] == pytest.approx(full["final"]["accuracy"], abs=1e-9)
    assert resumed["final"]["mean"] == pytest.approx(full["final"]["mean"], abs=1e-5)


def test_resume_with_dropout_is_exact(runs):
    drop = runs["dropout"]
    full, resumed = drop["full"]["losses"], drop["resumed"]["losses"]
    assert len(full) == 6 and len(resumed) == 6 - drop["save"]
    # dropout is really on: the same weights without it give another first loss
    assert full[0] != runs["zero2"]["losses"][0]
    assert resumed == full[drop["save"]:], (full, resumed)
    assert drop["resumed"]["grad_norms"] == drop["full"]["grad_norms"][drop["save"]:]


def test_export_scores_like_the_engine(runs, tmp_path):
    """The ZeRO-3 export (gathered from 2 ranks) scored by tools/score_reward.py reproduces the
    engine's own end-of-training evaluation."""
    export = Path(runs["zero3"]["export_dir"])
    stats = hf_model.load_reward_stats(export)
    final = runs["zero3"]["final"]
    assert stats["mean"] == pytest.approx(final["mean"]) and stats["std"] == pytest.approx(final["std"])
    pairs = [json.loads(l) for l in runs["test"].read_text().splitlines()]
    convs = tmp_path / "convs.jsonl"
    lines = []
    for p in pairs:
        for key in ("chosen", "rejected"):
            lines.append(json.dumps({"messages": p["prompt"] + [{"role": "assistant", "content": p[key]}]}))
    lines[3:3] = ["{not json", json.dumps({"messages": [{"role": "user", "content": "no answer"}]})]
    convs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "scored.jsonl"
    summary = score_main(["--model-path", str(export), "--input-path", str(convs),
                          "--output-path", str(out), "--seq-length", "96"])
    assert summary["scored"] == 2 * len(pairs) and summary["skipped_lines"] == [4, 5]
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    rewards = [r["reward"] for r in rows]
    chosen, rejected = rewards[0::2], rewards[1::2]
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    mean = sum(rewards) / len(rewards)
    assert accuracy == pytest.approx(final["accuracy"], abs=1e-9)
    assert mean == pytest.approx(final["mean"], abs=1e-4)
    assert sum(c for c in chosen) / len(chosen) == pytest.approx(final["chosen_mean"], abs=1e-4)
    assert rows[0]["reward_normalized"] == pytest.approx((rows[0]["reward"] - stats["mean"]) / stats["std"])
