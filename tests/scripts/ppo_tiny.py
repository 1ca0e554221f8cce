"""Tiny PPO inputs made on the spot: an actor (Qwen2ForCausalLM, 64-token vocabulary), a reward
model trained for a few seconds to prefer responses rich in TARGET, token-id prompts and a
pretraining indexed dataset. Used by tests/test_ppo*.py and bench/ppo_step.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VOCAB, PAD, STOP, TARGET = 32, 0, 1, 7
FIRST_PROMPT_TOKEN = 10  # prompts never contain TARGET


def tiny_qwen2_config(**over):
    from transformers import Qwen2Config

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=PAD, eos_token_id=STOP,
              pad_token_id=PAD)
    kw.update(over)
    return Qwen2Config(**kw)


def make_actor(out_dir: Path, seed: int = 0, **config_over) -> Path:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_qwen2_config(**config_over))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def fake_rollouts(n: int, rng: np.random.Generator) -> tuple[list[list[int]], list[float]]:
    """Prompt + response sequences and their label: 4 x the share of TARGET in the response."""
    seqs, labels = [], []
    for _ in range(n):
        prompt = rng.integers(FIRST_PROMPT_TOKEN, VOCAB, size=rng.integers(3, 7)).tolist()
        length = int(rng.integers(1, 9))
        share = rng.uniform(0, 1) ** 2
        resp = [TARGET if rng.uniform() < share else int(rng.integers(2, VOCAB)) for _ in range(length)]
        if rng.uniform() < 0.5:
            resp.append(STOP)
        seqs.append(prompt + resp)
        labels.append(4.0 * sum(t == TARGET for t in resp) / len(resp))
    return seqs, labels


def _right_pad(seqs):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def train_reward_model(out_dir: Path, seed: int = 0, steps: int = 150) -> dict:
    """A real QwenWithHead regressed onto the TARGET share; exported with its reward stats."""
    from transformers import Qwen2Model

    from megatron_qwen.rlhf.hf_model import QwenWithHead, save_with_head

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = QwenWithHead(Qwen2Model(tiny_qwen2_config()))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        seqs, labels = fake_rollouts(32, rng)
        ids, mask = _right_pad(seqs)
        loss = torch.nn.functional.mse_loss(model.reward(ids, mask), torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        seqs, labels = fake_rollouts(256, rng)
        ids, mask = _right_pad(seqs)
        scores = model.reward(ids, mask)
        corr = float(np.corrcoef(scores.numpy(), np.array(labels))[0, 1])
    stats = {"mean": float(scores.mean()), "std": float(scores.std()), "count": len(seqs)}
    save_with_head(model.state_dict(), model.config, out_dir, reward_stats=stats)
    return {"final_mse": loss.item(), "heldout_corr": corr, **stats}


def make_prompts(path: Path, n: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed + 1)
    with open(path, "w") as f:
        for _ in range(n):
            ids = rng.integers(FIRST_PROMPT_TOKEN, VOCAB, size=rng.integers(3, 7)).tolist()
            f.write(json.dumps({"input_ids": ids}) + "\n")
    return Path(path)


def make_ptx(prefix: Path, n_docs: int = 32, seed: int = 0) -> Path:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed + 2)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for _ in range(n_docs):
        doc = rng.integers(2, VOCAB, size=rng.integers(4, 20)).astype(np.int32)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return Path(prefix)


def make_all(root: Path, seed: int = 0) -> dict:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info = train_reward_model(root / "rm", seed)
    return {"actor": make_actor(root / "actor", seed), "rm": root / "rm", "rm_info": info,
            "prompts": make_prompts(root / "prompts.jsonl", seed=seed), "ptx": make_ptx(root / "ptx", seed=seed)}


def recipe_args(paths: dict, out: Path, **over) -> list[str]:
    """Command-line settings of a tiny CPU PPO run on ``paths`` (from make_all)."""
    settings = {
        "actor-path": paths["actor"], "reward-path": paths["rm"], "prompt-data-path": paths["prompts"],
        "stop-token-id": STOP, "pad-token-id": PAD, "prompts-per-step": 4, "samples-per-prompt": 2,
        "max-new-tokens": 6, "unfinished-rule": "truncate", "mini-batch-size": 4, "ppo-epochs": 2,
        "value-warmup-steps": 2, "actor-lr": 1e-2, "critic-lr": 5e-3, "kl-coef": 0.04,
        "ptx-data-path": paths["ptx"], "ptx-coef": 0.05, "ptx-batch-size": 2, "ptx-seq-length": 16,
        "actor-zero-stage": 2, "critic-zero-stage": 2, "ref-zero-stage": 3, "reward-zero-stage": 3,
        "train-iters": 12, "metrics-jsonl": Path(out) / "metrics.jsonl", "seed": 1,
    }
    settings.update({k.replace("_", "-"): v for k, v in over.items()})
    args = []
    for k, v in settings.items():
        if v is not None:
            args += [f"--{k}", str(v)]
    return args
