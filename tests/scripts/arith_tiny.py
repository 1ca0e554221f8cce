"""A tiny Qwen2 fine-tuned for a few seconds on the demo's arithmetic conversations
(megatron_qwen/data/demo_data.py), so that it answers sums of two digits in the right format but
often wrongly: the start of tests/test_ppo_arithmetic.py's PPO run. The tokenizer is Qwen's BPE
cut to its first merges (tests/scripts/sft_common.py): ChatML exactly, a 4,304-token vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from sft_common import PADDED_VOCAB


def tiny_config(vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, rms_norm_eps=1e-6)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(model_cls, tok, rendered, steps, seed, lr, batch):
    """AdamW on the assistant tokens of random batches of ``rendered`` conversations."""
    torch.manual_seed(seed)
    model = model_cls(tiny_config(PADDED_VOCAB))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = random.Random(seed)
    for _ in range(steps):
        rows = gen.sample(rendered, batch)
        width = max(len(r.ids) for r in rows)
        ids = torch.tensor([r.ids + [tok.eod_id] * (width - len(r.ids)) for r in rows])
        mask = torch.tensor([r.loss_mask + [0] * (width - len(r.loss_mask)) for r in rows], dtype=torch.bool)
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        targets = mask[:, 1:]
        logits = model.lm_head(hidden[targets])
        loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][targets])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, loss


def sft_actor(out_dir: Path, steps: int, seed: int = 0, lr: float = 3e-3, batch: int = 32) -> dict:
    """Train on the SFT arithmetic conversations (assistant tokens only); write the model, a
    critic initialisation (the backbone + a zero value head), train/held-out prompt files."""
    from transformers import Qwen2ForCausalLM

    from megatron_qwen.data.demo_data import arithmetic_sets
    from megatron_qwen.rlhf.hf_model import QwenWithHead, save_with_head
    from megatron_qwen.tokenizer import load_tokenizer, render_chatml
    from sft_common import write_small_bpe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_small_bpe(out_dir / "small.tiktoken")
    tok = load_tokenizer(out_dir / "small.tiktoken")
    sets = arithmetic_sets(random.Random(1234))
    rendered = [render_chatml(c["messages"], tok) for c in sets["sft"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums, so the same model, whatever the machine's cores
    try:
        model, loss = _train(Qwen2ForCausalLM, tok, rendered, steps, seed, lr, batch)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(str(out_dir / "actor"), safe_serialization=True)
    critic = QwenWithHead(model.model)
    with torch.no_grad():
        for p in critic.head.parameters():
            p.zero_()
    save_with_head(critic.state_dict(), model.config, out_dir / "critic")
    return {"actor": out_dir / "actor", "tokenizer": out_dir / "small.tiktoken", "critic": out_dir / "critic", "sft_loss": loss.item(),
            "prompts": write_jsonl(out_dir / "prompts.jsonl", sets["prompts"]),
            "prompts_test": write_jsonl(out_dir / "prompts_test.jsonl", sets["prompts_test"])}
