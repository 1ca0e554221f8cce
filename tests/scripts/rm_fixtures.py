"""Test inputs for the reward model: a tiny random Qwen2 with the real vocabulary, and
comparison pairs made from real English (chosen = a sentence from the Python language
reference, rejected = the same words shuffled)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

PROMPT = [{"role": "user", "content": "Quote one sentence from the Python language reference."}]


def real_sentences(min_words: int = 6, max_words: int = 18) -> list:
    from megatron_qwen.data import real_corpus

    out = []
    for doc in real_corpus.python_doc_topics():
        for sent in re.split(r"(?<=[.!?])\s+", " ".join(doc["text"].split())):
            words = sent.split()
            if (min_words <= len(words) <= max_words and sent[0].isupper() and sent.endswith(".")
                    and ">>>" not in sent and "::" not in sent):
                out.append(sent)
    return sorted(set(out))


# Bad records planted in the training file: (line number, reason the data module gives)
BAD_LINES = {2: "malformed_json", 5: "identical_pair", 9: "unknown_role"}


def make_pairs(out_dir, n_train: int = 192, n_test: int = 64, seed: int = 0) -> tuple:
    """Write pairs_train.jsonl (with BAD_LINES planted) / pairs_test.jsonl (disjoint sentences)."""
    rng = random.Random(seed)
    sentences = real_sentences()
    rng.shuffle(sentences)
    pairs = []
    for sent in sentences:
        words = sent.split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        pairs.append({"prompt": PROMPT, "chosen": sent, "rejected": " ".join(shuffled)})
        if len(pairs) == n_train + n_test:
            break
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "pairs_train.jsonl", out_dir / "pairs_test.jsonl"
    train = [json.dumps(r) for r in pairs[:n_train]]
    bad = {"malformed_json": '{"prompt": [{"role": "user", "content": "x"}], "chosen": ',
           "identical_pair": json.dumps({"prompt": PROMPT, "chosen": "Same.", "rejected": "Same."}),
           "unknown_role": json.dumps({"prompt": [{"role": "robot", "content": "hi"}, *PROMPT],
                                       "chosen": "a", "rejected": "b"})}
    for line, reason in sorted(BAD_LINES.items()):
        train.insert(line - 1, bad[reason])
    paths[0].write_text("\n".join(train) + "\n")
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in pairs[n_train:]))
    return paths


def make_tiny_qwen2(out_dir, seed: int = 0, vocab_size: int = 151936, hidden: int = 32,
                    layers: int = 2) -> Path:
    """A random Qwen2ForCausalLM saved in the qwen2 layout (what the converter writes)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         rms_norm_eps=1e-6)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def with_attention_dropout(model_dir, out_dir, p: float) -> Path:
    """A copy of ``model_dir`` whose config turns Qwen2's attention dropout (its only dropout) on."""
    import shutil

    out_dir = Path(shutil.copytree(model_dir, out_dir))
    config = json.loads((out_dir / "config.json").read_text())
    config["attention_dropout"] = p
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return out_dir
