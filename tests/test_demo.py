"""The demo's whole chain at its smallest size: CI notices when any stage breaks it."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["data", "extract", "langid", "dedup-exact", "dedup-minhash", "filter", "decontaminate", "tokenize",
          "pretrain", "pretrain-resume", "pretrain-to-hf", "sft", "sft-to-hf", "reward-model", "ppo", "eval",
          "final-to-mcore", "chat"]


def test_demo_chain_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "examples/demo.py", "--out", str(out), "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["stage"] for row in summary] == STAGES
    metric = {row["stage"]: row["metric"] for row in summary}
    # the corpus tools removed what was planted
    assert "exact_duplicate" in metric["dedup-exact"] and "near_duplicate" in metric["dedup-minhash"]
    assert "benchmark:demo_bench" in metric["decontaminate"]
    # held-out numbers, before -> after: pretraining lowered the validation perplexity across the
    # stop/resume; SFT lowered the held-out assistant loss and kept plain-text perplexity within
    # 1.5x of the base (the PPO and reward-model gains need more steps than --smoke: see
    # tests/test_ppo_arithmetic.py)
    assert metric["pretrain-resume"].startswith("held-out ppl"), metric["pretrain-resume"]
    ev = json.loads((out / "eval" / "heldout.json").read_text())
    assert ev["sft"]["assistant_loss"] < ev["base"]["assistant_loss"], ev
    assert ev["sft"]["plain_ppl"] < 1.5 * ev["base"]["plain_ppl"], ev
    for stage in ("sft", "reward-model", "ppo"):
        assert " -> " in metric[stage], (stage, metric[stage])
    chat = json.loads((out / "chat.json").read_text())
    assert chat["same"] and chat["megatron_core"] == chat["transformers"]
    assert (out / "curves.png").stat().st_size > 10_000
    # the pretraining checkpoint went through a real stop and resume
    log = (out / "logs" / "pretrain-resume.log").read_text()
    assert "resumed from" in log

    # the same seeds give the same held-out numbers: the evaluation re-run reproduces them
    (out / ".done" / "eval").unlink()
    redo = subprocess.run([sys.executable, "examples/demo.py", "--out", str(out), "--smoke", "--until", "eval"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert redo.returncode == 0, redo.stdout[-4000:] + redo.stderr[-4000:]
    assert json.loads((out / "eval" / "heldout.json").read_text()) == ev

    # a re-run skips every finished stage
    again = subprocess.run([sys.executable, "examples/demo.py", "--out", str(out), "--smoke"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == len(STAGES)
