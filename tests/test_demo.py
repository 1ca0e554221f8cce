"""The demo's whole chain at its smallest size: CI notices when any stage breaks it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["data", "extract", "langid", "dedup-exact", "dedup-minhash", "filter", "decontaminate", "tokenize",
          "pretrain", "pretrain-resume", "pretrain-to-hf", "sft", "sft-to-hf", "reward-model", "ppo", "eval",
          "final-to-mcore", "long-context", "chat"]
TINY_RECIPES = ["pretrain_tiny.yaml", "sft_tiny.yaml", "rm_tiny_cpu.yaml", "ppo_tiny_cpu.yaml"]
# the flags of the recipes' demo_out/ paths: the demo passes none of them (the defaults are proven)
PATH_FLAGS = ("--data-path", "--data-cache-path", "--save", "--load", "--tensorboard-dir", "--sft-data-path",
              "--pretrained-checkpoint", "--model-path", "--train-data-path", "--test-data-path", "--export-dir",
              "--actor-path", "--reward-path", "--prompt-data-path", "--ptx-data-path")
# the reward model's DeepSpeed state and the SFT checkpoint: deleted once exported to HF
PRUNED = {"demo_out/ckpt/rm", "demo_out/ckpt/sft"}


def demo_paths(text: str) -> list:
    return re.findall(r"demo_out/[^\s`'\"),;\]]+", text)


def documented_demo_paths() -> dict:
    """{path: where} for every demo_out/ path in the README, docs and the tiny recipes."""
    found = {}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for path in demo_paths(line):
                found.setdefault(path.rstrip("."), f"{doc.name}:{number}")

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{where}.{key}" if where.count(":") else f"{where}:{key}")
        elif isinstance(node, list):
            for value in node:
                walk(value, where)
        elif isinstance(node, str) and node.startswith("demo_out/"):
            found.setdefault(node, where)

    for name in TINY_RECIPES:
        text = (REPO / "examples" / name).read_text()
        walk(yaml.safe_load(text), name)
        for path in demo_paths("\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))):
            found.setdefault(path, f"{name} (comment)")
    return found


def test_demo_chain_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo_out"  # named so: the stages run on the recipes' own default paths
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
    # 1.5x of the base; the reward model prefers the right sum to a repeated operand on sums it
    # never saw (the SFT model's likelihood prefers the copy; measured 0.048 -> 0.784 at --smoke)
    # (the PPO gain needs more steps than --smoke: see tests/test_ppo_arithmetic.py and docs/ppo.md)
    held = re.match(r"held-out ppl ([\d,]+) \(it\. (\d+)\) -> ([\d,]+) \(it\. (\d+)", metric["pretrain-resume"])
    assert held, metric["pretrain-resume"]
    (ppl_stop, it_stop), (ppl_end, it_end) = ((float(held[i].replace(",", "")), int(held[i + 1])) for i in (1, 3))
    assert it_stop < it_end and ppl_end < ppl_stop, metric["pretrain-resume"]
    ev = json.loads((out / "eval" / "heldout.json").read_text())
    assert ev["sft"]["assistant_loss"] < ev["base"]["assistant_loss"], ev
    assert ev["sft"]["plain_ppl"] < 1.5 * ev["base"]["plain_ppl"], ev
    assert ev["rm"]["pair_accuracy"] > 0.6 and ev["sft"]["pair_accuracy"] < 0.4, ev
    for stage in ("sft", "reward-model", "ppo"):
        assert " -> " in metric[stage], (stage, metric[stage])
    chat = json.loads((out / "chat.json").read_text())
    assert chat["same"] and chat["megatron_core"] == chat["transformers"]
    assert chat["transformers"].strip(), chat  # PPO's unfinished-answer penalty once taught it to stop at once
    assert (out / "curves.png").stat().st_size > 10_000
    # the pretraining checkpoint went through a real stop and resume
    log = (out / "logs" / "pretrain-resume.log").read_text()
    assert "resumed from" in log

    # every line of every stage reaches the console, indentation kept (a tool's removal reasons)
    assert re.search(r"^    removed +\d+ +\(\w+ \d+", proc.stdout, re.M), proc.stdout[-3000:]
    # the training stages ran on the tiny recipes' default paths, which are the demo's outputs
    commands = [line for line in proc.stdout.splitlines() if re.match(r"(\(in \S+\) )?\$ ", line) and "--config" in line]
    assert len(commands) == 5 and not [c for c in commands if set(c.split()) & set(PATH_FLAGS)], commands
    # every demo_out/ path the README, docs and tiny recipes name is there (a prefix: its files)
    for path, where in documented_demo_paths().items():
        there = (tmp_path / path).exists() or any((tmp_path / path).parent.glob((tmp_path / path).name + "*"))
        assert there != (path in PRUNED), f"{where}: {path}"
    # only what a later stage reads is kept: the last pretraining iteration, the last PPO step
    assert len(list((out / "ckpt/pretrain").glob("iter_*"))) == 1
    assert len(list((out / "ckpt/ppo").glob("step_*"))) == 1
    # the training length (SFT's 128) survived SFT -> HF -> PPO -> mcore: the table is at 1x/4x/8x
    table = json.loads((out / "long_context.json").read_text())
    assert table["train_length"] == 128 and table["lengths"] == [128, 512, 1024]
    assert len(table["perplexity"]) == 4 and metric["long-context"].startswith("ppl at 1024 (8x 128)")
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


def test_fresh_deletes_a_previous_demo_and_refuses_other_directories(tmp_path):
    """--fresh must start over, not resume: the markers alone are not enough (pretraining resumed
    from the old checkpoint and trained no step; the converters refused their old outputs)."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import demo
    finally:
        sys.path.remove(str(REPO / "examples"))
    old = tmp_path / "demo_out"
    (old / ".done").mkdir(parents=True)
    (old / ".done" / "pretrain").write_text("1.0")
    (old / "ckpt" / "pretrain" / "iter_0000200").mkdir(parents=True)
    demo.start_fresh(old)
    assert not old.exists()
    demo.start_fresh(old)  # nothing there: nothing to do

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    try:
        demo.start_fresh(other)
    except SystemExit as exc:
        assert "not a demo output directory" in str(exc) and str(other) in str(exc)
    else:
        raise AssertionError("--fresh deleted a directory the demo did not make")
    assert (other / "notes.txt").read_text() == "keep me"
