"""The tiny recipe through the real entry point: it learns real text, and SIGTERM saves + exits."""

import json
import math
import os
import signal
import subprocess
import sys
import time

from tests.dist import REPO

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from train_common import read_metrics, write_corpus  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}


def _cli(*args):
    return [sys.executable, str(REPO / "pretrain_qwen.py"), "--config", str(REPO / "examples/pretrain_tiny.yaml"),
            *map(str, args)]


def test_tiny_recipe_loss_falls_from_ln_vocab_on_real_text(tmp_path):
    data = str(tmp_path / "docs")
    write_corpus(data)  # Python's docs, real Qwen tokenizer, 151,851-token vocabulary
    proc = subprocess.run(
        _cli("--data-path", data, "--data-cache-path", tmp_path / "cache", "--save", "none", "--load", "none",
             "--tensorboard-dir", tmp_path / "tb", "--metrics-file", tmp_path / "m.jsonl",
             "--seq-length", 64, "--micro-batch-size", 4, "--global-batch-size", 4, "--train-iters", 30,
             "--lr", 1e-2, "--min-lr", 1e-3, "--lr-warmup-iters", 5, "--log-interval", 1,
             "--eval-interval", 30, "--eval-iters", 2),
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(tmp_path / "m.jsonl")
    first, last5 = rows[0]["lm_loss"], sum(r["lm_loss"] for r in rows[-5:]) / 5
    assert abs(first - math.log(151851)) < 0.2  # an untrained model is uniform over the vocabulary
    assert last5 < first - 4.0, f"loss {first:.2f} -> {last5:.2f}"
    valid = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines() if "valid_lm_loss" in x]
    assert valid and valid[0]["valid_lm_loss"] < first - 3.0
    assert "resolved config:" in proc.stdout and '"seq_length": 64' in proc.stdout
    assert rows[-1]["tokens_per_sec"] > 0 and rows[-1]["mfu"] is None  # CPU: MFU n/a
    assert "MFU n/a" in proc.stdout
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes(tmp_path):
    data = str(tmp_path / "toy")
    write_corpus(data, vocab_size=1000, max_docs=40)
    common = ["--model.preset", "tiny_vocab", "--data-path", data, "--eod-id", 999, "--split", "1,0,0",
              "--data-cache-path", tmp_path / "cache", "--save", tmp_path / "ckpt", "--load", tmp_path / "ckpt",
              "--tensorboard-dir", "none", "--micro-batch-size", 2, "--global-batch-size", 4,
              "--log-interval", 1, "--eval-interval", "none", "--save-interval", "none"]
    metrics = tmp_path / "m.jsonl"
    proc = subprocess.Popen(_cli(*common, "--train-iters", 100000, "--metrics-file", metrics),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    k = read_metrics(metrics)[-1]["iteration"]
    assert f"exiting at iteration {k} (signal received) after saving" in out
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(k)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))

    metrics2 = tmp_path / "m2.jsonl"
    proc = subprocess.run(_cli(*common, "--train-iters", k + 2, "--metrics-file", metrics2),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {tmp_path / 'ckpt' / f'iter_{k:07d}'}: iteration {k}, {4 * k} samples consumed" in proc.stdout
    rows = read_metrics(metrics2)
    assert [r["iteration"] for r in rows] == [k + 1, k + 2]
    assert rows[-1]["consumed_samples"] == 4 * (k + 2)
