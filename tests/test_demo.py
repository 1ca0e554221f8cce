"""The demo's whole chain at its smallest size: CI notices when any stage breaks it."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["data", "extract", "langid", "dedup-exact", "dedup-minhash", "filter", "decontaminate", "tokenize",
          "pretrain", "pretrain-resume", "sft", "sft-to-hf", "reward-model", "ppo", "final-to-mcore", "chat"]


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
    # the pretraining loss fell across the stop/resume, and the two chats agreed
    first, last = (float(x) for x in metric["pretrain-resume"].split(": ")[1].split(" -> "))
    assert last < first
    chat = json.loads((out / "chat.json").read_text())
    assert chat["same"] and chat["megatron_core"] == chat["transformers"]
    assert (out / "curves.png").stat().st_size > 10_000
    # the pretraining checkpoint went through a real stop and resume
    log = (out / "logs" / "pretrain-resume.log").read_text()
    assert "resumed from" in log

    # a re-run skips every finished stage
    again = subprocess.run([sys.executable, "examples/demo.py", "--out", str(out), "--smoke"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == len(STAGES)
