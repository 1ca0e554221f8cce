"""The demo's raw data, made from real text (``real_corpus``), with known defects planted.

The corpus tools must have something to do, so the raw corpus carries what a web crawl carries:
HTML pages, exact and near duplicates, junk documents, and passages of a "benchmark" test set.
Next to it: a ChatML instruction set (instructions on the corpus text and two-digit sums),
arithmetic preference pairs (chosen = the right sum, rejected = an operand repeated) and arithmetic PPO
prompts, each with a held-out set that no stage trains on, and held-out documents for the
plain-text perplexity. Everything is deterministic.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from megatron_qwen.data import real_corpus

_SENTENCE = re.compile(r"(.+?[.!?。！？])(\s|$)", re.S)


_HEADING = re.compile(r"^[^\n]*\n[*=-]{3,}\n")  # a reST title and its underline


def first_sentence(text: str, max_chars: int = 160) -> str:
    text = " ".join(_HEADING.sub("", text.strip(), count=1).split())
    m = _SENTENCE.match(text)
    sent = (m.group(1) if m else text)[:max_chars]
    return sent.strip()


def _near_duplicate(text: str, rng: random.Random, edit_fraction: float = 0.01) -> str:
    words = text.split(" ")
    for _ in range(max(1, int(len(words) * edit_fraction))):
        i = rng.randrange(len(words))
        words[i] = words[i][::-1]
    return " ".join(words)


def _junk(rng: random.Random, i: int) -> dict:
    kinds = [
        " ".join("#" * rng.randint(1, 4) for _ in range(60)),  # symbols, no words
        "\n".join(["- click here"] * 30),  # bullets, repeated lines
        "buy " * 200,  # one repeated word
    ]
    return {"id": f"junk:{i}", "source": "planted-junk", "text": kinds[i % len(kinds)]}


HELDOUT_EVERY = 25  # one document in 25 is held out of every training set
ADD_RANGE = 10  # the arithmetic questions: A + B with A, B in [0, ADD_RANGE)
PHRASINGS = ("What is {a}+{b}?", "Compute {a} + {b}.", "{a}+{b}=?", "Add {a} and {b}: {a}+{b}", "How much is {a} + {b}?")


def arithmetic_sets(rng: random.Random) -> dict:
    """Sums of two digits, split by the (A, B) pair: SFT answers half the pairs, PPO asks a
    quarter, a quarter is never trained on (SFT's held-out loss, the reward model's held-out
    pairs, ``prompts_unseen``). ``prompts_test`` asks PPO's sums in the one phrasing PPO never
    trains with: a tiny model does not learn addition from 50 sums, so the PPO effect it can
    show is on its own sums in new words (docs/ppo.md gives both numbers)."""
    pairs = [(a, b) for a in range(ADD_RANGE) for b in range(ADD_RANGE)]
    rng.shuffle(pairs)
    half, three_q = len(pairs) // 2, 3 * len(pairs) // 4
    sft_pairs, ppo_pairs, test_pairs = pairs[:half], pairs[half:three_q], pairs[three_q:]

    def question(a: int, b: int, k: int) -> list:
        return [{"role": "user", "content": PHRASINGS[k % len(PHRASINGS)].format(a=a, b=b)}]

    def preference(a: int, b: int, k: int) -> dict:
        # rejected: the tiny model's own mistake, a number of the question repeated instead of the
        # sum (a copy it prefers by likelihood; spotting it carries over to sums never trained on),
        # else (0+0) a near miss
        copied = sorted({a, b} - {a + b})
        wrong = rng.choice(copied or [a + b + d for d in (1, 2, 3)])
        return {"prompt": question(a, b, k), "chosen": str(a + b), "rejected": str(wrong)}

    sft = [{"messages": question(a, b, k) + [{"role": "assistant", "content": str(a + b)}]}
           for a, b in sft_pairs for k in range(len(PHRASINGS))]
    sft_test = [{"messages": question(a, b, k) + [{"role": "assistant", "content": str(a + b)}]}
                for k, (a, b) in enumerate(test_pairs)]
    return {
        "sft": sft, "sft_test": sft_test,
        "prompts": [{"messages": question(a, b, k)} for a, b in ppo_pairs for k in range(len(PHRASINGS) - 1)],
        "prompts_test": [{"messages": question(a, b, len(PHRASINGS) - 1)} for a, b in ppo_pairs],
        "prompts_unseen": [{"messages": question(a, b, k)} for k, (a, b) in enumerate(test_pairs)],
        "pairs_train": [preference(a, b, k) for a, b in sft_pairs + ppo_pairs for k in range(len(PHRASINGS))],
        "pairs_test": [preference(a, b, k) for a, b in test_pairs for k in range(len(PHRASINGS))],
    }


def multi_turn(conversations: list, rng: random.Random, turns: int = 4, rounds: int = 4) -> list:
    """The single-turn arithmetic conversations again, ``turns`` to a conversation, ``rounds``
    times over in fresh orders: each sum is a few tokens, so this gives the skill PPO builds on
    its weight in the SFT loss for few extra tokens (no system prompt repeated per sum)."""
    out = []
    for _ in range(rounds):
        order = conversations[:]
        rng.shuffle(order)
        for i in range(0, len(order) - turns + 1, turns):
            out.append({"messages": [m for c in order[i:i + turns] for m in c["messages"]]})
    return out


def _passage(text: str, words: int) -> str:
    return " ".join(_HEADING.sub("", text.strip(), count=1).split()[:words])


def instruction_sets(docs: list, rng: random.Random) -> tuple[list, list]:
    """Instructions on the corpus text: continue a passage (the assistant writes real text, so SFT
    keeps practising plain language modelling) and quote a given text's first sentence (a copy
    task that carries over to unseen texts), plus questions to memorise (a topic's first
    sentence). The held-out set has only the tasks that carry over, on documents of its own."""
    english = [d for d in docs if d.get("lang") == "en" and len(d["text"].split()) > 60]
    rng.shuffle(english)
    cut = len(english) // 8
    train_docs, test_docs = english[cut:], english[:cut]

    def tasks(d: dict, k: int) -> list:
        words = d["text"].split()
        out = []
        if k % 2 == 0:
            out.append([{"role": "user", "content": "Continue the text: " + _passage(d["text"], 24)},
                        {"role": "assistant", "content": " ".join(words[24:24 + CONTINUE_WORDS])}])
        else:
            first = first_sentence(d["text"], max_chars=120)
            if len(first.split()) >= 3:
                out.append([{"role": "user", "content": "Quote the first sentence of this text:\n"
                             + _passage(d["text"], 40)}, {"role": "assistant", "content": first}])
        return out

    sft = [{"messages": m} for k, d in enumerate(train_docs) for m in tasks(d, k)]
    sft_test = [{"messages": m} for k, d in enumerate(test_docs) for m in tasks(d, k)]
    for d in docs:  # memorised questions (tests/test_sft_train.py learns some of them by heart)
        if d.get("source") != "python-docs":
            continue
        answer = first_sentence(d["text"], max_chars=120)
        if len(answer.split()) >= 3:
            question = f"What is the first sentence of the Python documentation topic '{d['id'].split(':', 1)[1]}'?"
            sft.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return sft, sft_test


CONTINUE_WORDS = 48


def build(out_dir: Path, seed: int = 1234, max_chinese: int = 300) -> dict:
    """Write raw.jsonl, html.jsonl, benchmark.jsonl, heldout_text.jsonl, sft*.jsonl, pairs*.jsonl
    and prompts*.jsonl (the *_test files: held-out sets, disjoint from what is trained on)."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = real_corpus.multilingual_corpus(max_chinese=max_chinese)
    html = list(real_corpus.python_module_html(limit=12))
    # documents never trained on (pretraining nor SFT): the plain-text perplexity is measured on them
    # (not from the documentation topics: tests/test_sft_train.py memorises some of those)
    candidates = [d for d in docs if d.get("source") != "python-docs"]
    heldout_ids = {d["id"] for d in random.Random(seed + 1).sample(candidates, max(4, len(docs) // HELDOUT_EVERY))}
    heldout_text = [d for d in docs if d["id"] in heldout_ids]
    docs = [d for d in docs if d["id"] not in heldout_ids]

    raw = [dict(d) for d in docs]
    planted = {"exact": 0, "near": 0, "junk": 0, "benchmark": 0}
    for d in rng.sample(docs, 20):  # exact copies, with whitespace/case noise the normaliser removes
        raw.append({**d, "id": d["id"] + "#copy", "text": "  " + d["text"].upper() + "\n"})
        planted["exact"] += 1
    for d in rng.sample([d for d in docs if d.get("lang") == "en"], 15):
        raw.append({**d, "id": d["id"] + "#near", "text": _near_duplicate(d["text"], rng)})
        planted["near"] += 1
    for i in range(9):
        raw.append(_junk(rng, i))
        planted["junk"] += 1

    # A benchmark "test set": passages of 25+ words from some documents; decontamination must
    # remove those documents (and any instruction sample that quotes them).
    bench = []
    long_en = [d for d in docs if d.get("lang") == "en" and len(d["text"].split()) > 80]
    for j, d in enumerate(rng.sample(long_en, 8)):
        words = d["text"].split()
        start = rng.randrange(0, len(words) - 30)
        bench.append({"id": f"bench:{j}", "question": " ".join(words[start:start + 30]), "source_doc": d["id"]})
        planted["benchmark"] += 1
    rng.shuffle(raw)

    sft, sft_test = instruction_sets(docs, rng)
    arith = arithmetic_sets(rng)
    sft += arith["sft"] + multi_turn(arith["sft"], rng)
    rng.shuffle(sft)
    pairs = arith["pairs_train"]

    def write(name: str, rows: list) -> None:
        path = out_dir / name
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)

    write("raw.jsonl", raw)
    write("html.jsonl", html)
    write("benchmark.jsonl", bench)
    write("sft.jsonl", sft)
    write("sft_test.jsonl", sft_test + arith["sft_test"])
    write("heldout_text.jsonl", heldout_text)
    write("pairs_train.jsonl", pairs)
    write("pairs_test.jsonl", arith["pairs_test"])
    write("prompts.jsonl", arith["prompts"])
    write("prompts_test.jsonl", arith["prompts_test"])
    write("prompts_unseen.jsonl", arith["prompts_unseen"])
    return {"corpus": real_corpus.describe(docs), "raw_docs": len(raw), "html_pages": len(html),
            "planted": planted, "heldout_text": len(heldout_text), "sft": len(sft),
            "sft_test": len(sft_test) + len(arith["sft_test"]), "pairs": len(pairs),
            "pairs_test": len(arith["pairs_test"]), "prompts": len(arith["prompts"]),
            "prompts_test": len(arith["prompts_test"])}
