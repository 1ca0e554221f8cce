"""End-to-end PPO on CPU with four DeepSpeed engines and tiny real models.

The reward model is a real Qwen2 backbone + head, trained in the fixture to score responses by
their share of the TARGET token; the actor starts from random weights, so the only way up is to
learn to emit TARGET. One uninterrupted single-process run is the reference for three checks:
reward rises with bounded KL; 2-process ZeRO-2 and ZeRO-3 runs give the same curve; a run killed
mid-way and resumed continues the same curve. A short run with attention dropout on in the actor
and the critic, resumed from its step-3 checkpoint, repeats its own steps bit for bit.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import ppo_tiny  # noqa: E402

from tests.dist import REPO, free_port, run_torchrun  # noqa: E402

STEPS = 12
PARITY_STEPS = 8  # the 2-process runs compare the first steps (policy updates start at step 3)
SAVE_EVERY = 4
TOOL = REPO / "tools" / "train_ppo.py"


def read_curve(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_assets")
    paths = ppo_tiny.make_all(root)
    # the reward model really learned the property it is meant to reward
    assert paths["rm_info"]["heldout_corr"] > 0.8, paths["rm_info"]
    return paths


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    """One process, ZeRO-2 actor/critic + ZeRO-3 reference/reward, PPO-ptx on, checkpoints."""
    out = tmp_path_factory.mktemp("ppo_ref")
    args = ppo_tiny.recipe_args(assets, out, train_iters=STEPS, save=out / "ckpt", save_interval=SAVE_EVERY,
                                export_dir=out / "export", tensorboard_dir=out / "tb")
    log = run_torchrun(TOOL, *args, nproc=1)
    return {"out": out, "curve": read_curve(out / "metrics.jsonl"), "log": log}


def test_reward_rises_with_bounded_kl(reference_run, assets):
    curve = reference_run["curve"]
    assert [m["step"] for m in curve] == list(range(1, STEPS + 1))
    reward = [m["reward/raw"] for m in curve]
    first, last = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    assert last > first + 0.4, reward
    kl = [m["kl"] for m in curve]
    # 6 tokens per response: a policy collapsed onto TARGET would be at ~6 * ln(32) = 21 nats
    assert max(kl) < 12.0, kl
    # value warm-up: the actor is frozen for 2 steps, so the KL to the reference is exactly 0
    assert [m["policy_updated"] for m in curve[:3]] == [0.0, 0.0, 1.0]
    assert curve[0]["kl"] == 0.0 and curve[1]["kl"] == 0.0
    for key in ("entropy", "loss/policy", "loss/value", "loss/ptx", "clipfrac/policy", "clipfrac/value",
                "approx_kl", "response/length", "response/truncated_share", "reward/normalized",
                "time/generate", "time/score", "time/train", "tokens_per_s"):
        assert key in curve[-1], key
    assert "step 12 | reward/raw" in reference_run["log"]
    assert list((reference_run["out"] / "tb").glob("events.out.tfevents.*"))


def test_actor_export_loads_in_transformers(reference_run, assets):
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(reference_run["out"] / "export"), local_files_only=True)
    initial = AutoModelForCausalLM.from_pretrained(str(assets["actor"]), local_files_only=True)
    ids = torch.tensor([[10, 11, 12]])
    p_new = exported(ids).logits[0, -1].softmax(-1)[ppo_tiny.TARGET]
    p_old = initial(ids).logits[0, -1].softmax(-1)[ppo_tiny.TARGET]
    assert p_new > 2 * p_old, (p_new, p_old)  # the trained policy prefers the rewarded token


def test_two_processes_zero2_and_zero3_match_one_process(reference_run, assets, tmp_path):
    out = run_torchrun(REPO / "tests" / "scripts" / "ppo_parity.py", assets["actor"].parent, tmp_path,
                       PARITY_STEPS, nproc=2)
    for rank in (0, 1):
        assert f"rank {rank}: uneven stop under ZeRO-3 ok" in out
        assert f"rank {rank}: ZeRO-3 construction and gathered rollout ok" in out
    ref = reference_run["curve"]
    for layout in ("zero2", "zero3"):
        curve = read_curve(tmp_path / layout / "metrics.jsonl")
        assert len(curve) == PARITY_STEPS
        for a, b in zip(ref, curve):
            # same samples (per-sequence seeds), same global mini-batches and token-mean losses:
            # the curves agree to float round-off (measured: 3e-8 reward, 1e-4 KL, 2e-6 losses)
            assert b["reward/raw"] == pytest.approx(a["reward/raw"], abs=1e-3), (layout, a["step"])
            assert b["kl"] == pytest.approx(a["kl"], abs=2e-3), (layout, a["step"])
            assert b["loss/value"] == pytest.approx(a["loss/value"], rel=1e-3, abs=1e-5), (layout, a["step"])
            assert b.get("loss/policy", 0) == pytest.approx(a.get("loss/policy", 0), abs=1e-4), (layout, a["step"])


def test_killed_run_resumes_on_the_same_curve(reference_run, assets, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = ppo_tiny.recipe_args(assets, tmp_path, train_iters=1000, save=ckpt, save_interval=SAVE_EVERY)
    # a bare python process (the tool sets up a 1-rank group itself), so SIGKILL hits the trainer;
    # torchrun would start it in a session of its own, out of reach of the launcher's signal
    cmd = [sys.executable, str(TOOL), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 400
    try:  # kill -9 once step SAVE_EVERY is checkpointed and the run is past it
        while time.time() < deadline and proc.poll() is None:
            if (ckpt / "latest").is_file() and metrics.is_file() and len(read_curve(metrics)) > SAVE_EVERY:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = int((ckpt / "latest").read_text().strip().split("_")[1])
    assert resumed_from >= SAVE_EVERY and resumed_from < STEPS
    metrics.rename(tmp_path / "killed_metrics.jsonl")

    args = ppo_tiny.recipe_args(assets, tmp_path, train_iters=STEPS, save=ckpt, load=ckpt,
                                save_interval=SAVE_EVERY)
    log = run_torchrun(TOOL, *args, nproc=1)
    assert f"resumed from {ckpt / f'step_{resumed_from:07d}'} at step {resumed_from}" in log
    resumed = read_curve(metrics)
    assert [m["step"] for m in resumed] == list(range(resumed_from + 1, STEPS + 1))
    ref = {m["step"]: m for m in reference_run["curve"]}
    for m in resumed:
        for key in ("reward/raw", "kl", "loss/value", "loss/policy", "reward/running_mean"):
            assert m[key] == pytest.approx(ref[m["step"]][key], rel=1e-4, abs=1e-5), (key, m["step"])


def with_attention_dropout(model_dir: Path, out_dir: Path, p: float = 0.1) -> Path:
    """A copy of ``model_dir`` whose config turns Qwen2's attention dropout (its only dropout) on."""
    shutil.copytree(model_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["attention_dropout"] = p
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def test_resume_with_dropout_is_exact(reference_run, assets, tmp_path):
    """Dropout draws from torch's RNG in every actor and critic update; the checkpoint's RNG states
    make the resumed steps draw the same masks (a timing key is the only thing that may differ)."""
    steps, save_at = 5, 3  # the actor updates from step 3 on, so steps 4 and 5 use actor dropout
    drop = {**assets, "actor": with_attention_dropout(assets["actor"], tmp_path / "actor"),
            "rm": with_attention_dropout(assets["rm"], tmp_path / "rm")}  # the critic starts from the RM
    ckpt = tmp_path / "ckpt"
    run_torchrun(TOOL, *ppo_tiny.recipe_args(drop, tmp_path / "full", train_iters=steps, save=ckpt,
                                             save_interval=save_at), nproc=1)
    full = read_curve(tmp_path / "full" / "metrics.jsonl")
    # dropout is really on: without it the same weights give another first value loss
    assert full[0]["loss/value"] != reference_run["curve"][0]["loss/value"]
    (ckpt / "latest").write_text(f"step_{save_at:07d}\n")
    run_torchrun(TOOL, *ppo_tiny.recipe_args(drop, tmp_path / "resumed", train_iters=steps, load=ckpt), nproc=1)
    resumed = read_curve(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(save_at + 1, steps + 1))
    for got, want in zip(resumed, full[save_at:]):
        same = {k: v for k, v in want.items() if not k.startswith(("time/", "tokens_per_s", "generated_"))}
        assert {k: got[k] for k in same} == same, got["step"]
