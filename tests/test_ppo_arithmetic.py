"""PPO with the arithmetic rule (``--reward arithmetic``) raises the mean reward on held-out sums.

A tiny Qwen2 is fine-tuned for seconds on the demo's arithmetic conversations (so it answers in the
right format, often wrongly); tools/train_ppo.py then runs PPO on the demo's PPO prompts (sums of
digit pairs the SFT never answered) and the held-out reward is measured before and after on a
third set of pairs, with fixed seeds and several samples per prompt (rule_reward.heldout_reward).
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import arith_tiny  # noqa: E402

from tests.dist import REPO, run_torchrun  # noqa: E402

SFT_STEPS = 600
PPO_STEPS = 16
SAMPLES = 8
# run-to-run noise of the held-out mean reward, measured once (docs/ppo.md): PPO seeds 1, 2, 3
# from this SFT model ended at 0.31, 0.395, 0.32 (before: 0.21); the gain must exceed that spread
NOISE = 0.085


def heldout(model_dir, paths, seed=1):
    from megatron_qwen.rlhf import hf_model
    from megatron_qwen.rlhf.ppo.prompts import load_prompts
    from megatron_qwen.rlhf.ppo.rule_reward import heldout_reward
    from megatron_qwen.tokenizer import load_tokenizer

    import torch

    tok = load_tokenizer(paths["tokenizer"])
    prompts, _ = load_prompts(paths["prompts_test"], tok)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as when the noise was measured
    try:
        return heldout_reward(hf_model.load_causal_lm(model_dir).eval(), tok, prompts, SAMPLES, seed)
    finally:
        torch.set_num_threads(threads)


def ppo_args(paths, out: Path, seed: int = 1) -> list:
    settings = {
        "actor-path": paths["actor"], "reward-path": paths["critic"], "tokenizer-path": paths["tokenizer"],
        "prompt-data-path": paths["prompts"], "reward": "arithmetic", "prompts-per-step": 8,
        "samples-per-prompt": 4, "max-new-tokens": 4, "mini-batch-size": 8, "ppo-epochs": 2,
        "value-warmup-steps": 1, "actor-lr": 3e-4, "critic-lr": 1e-3, "kl-coef": 0.04,
        "actor-zero-stage": 0, "critic-zero-stage": 0, "ref-zero-stage": 0, "reward-zero-stage": 0,
        "train-iters": PPO_STEPS, "seed": seed, "rollout-seed": seed, "export-dir": out / "export",
        "metrics-jsonl": out / "metrics.jsonl",
    }
    return [a for k, v in settings.items() for a in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_arith")
    paths = arith_tiny.sft_actor(root / "assets", SFT_STEPS)
    log = run_torchrun(REPO / "tools" / "train_ppo.py", *ppo_args(paths, root), nproc=1)
    curve = [json.loads(l) for l in (root / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {"paths": paths, "root": root, "curve": curve, "log": log}


def test_heldout_reward_rises_by_more_than_the_noise(run):
    before = heldout(run["paths"]["actor"], run["paths"])
    after = heldout(run["root"] / "export", run["paths"])
    assert after["mean_reward"] > before["mean_reward"] + NOISE, (before, after)


def test_the_policy_moves_and_the_kl_is_non_negative(run):
    curve = run["curve"]
    updated = [m for m in curve if m["policy_updated"]]
    assert max(m["approx_kl"] for m in updated) > 1e-3
    assert max(m["clipfrac/policy"] for m in updated) > 0
    assert all(m["kl"] >= 0 for m in curve)
    assert max(m["kl"] for m in curve) > 0.01
