#!/usr/bin/env python
"""preprocess_data.py throughput vs raw tiktoken encoding of the same text, per worker.

Builds a JSONL corpus of real text found on this machine (the Qwen report seeds if present,
CPython's standard-library sources and docs, the test corpus), cut at blank lines into few-KB
documents like web pages, then times on the same documents:

* raw x N: tiktoken's ``encode_ordinary`` on N forked processes, each a contiguous 1/N of the
  texts already in memory (N = 1: one thread in this process). The ceiling for N workers on
  this machine: N processes of pure encoding, sharing its cores, caches and memory bandwidth;
* the tool on N workers: read + JSON parse + encode + megatron-core writer, ``--append-eod``.

The per-worker figure is the tool on N workers over raw x N (wall-clock tokens/s; the CPU-second
ratio is printed too). A virtual machine's speed drifts by tens of percent from one second to
the next, so the corpus is cut into --parts files and each part is run as a (raw, tool) pair
back to back, alternating which goes first; the figure is total raw time over total tool time,
with the median and quartiles of the pairs' ratios.

    python bench/preprocess_data.py [--mb 30] [--workers 1 2] [--parts 4] [--repeat 5]
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def as_documents(text: str, size: int = 6000) -> list:
    """Cut a long text at blank lines into web-page-sized documents (a few KB each)."""
    docs, cur = [], ""
    for part in text.split("\n\n"):
        if cur and len(cur) + len(part) > size:
            docs.append(cur)
            cur = ""
        cur = f"{cur}\n\n{part}" if cur else part
    return docs + ([cur] if cur.strip() else [])


def corpus(limit_bytes: int) -> list:
    from megatron_qwen.data.real_corpus import python_sources

    texts = []
    seeds = Path("/work/shared/seeds")
    if seeds.is_dir():
        texts += [p.read_text(errors="replace") for p in sorted(seeds.glob("*.txt"))]
    texts += [json.loads(x)["text"] for x in (REPO / "tests/data/multilingual.jsonl").read_text().splitlines()]
    have = sum(map(len, texts))
    texts += [d["text"] for d in python_sources(max(0, limit_bytes - have))]
    return [d for t in texts for d in as_documents(t)]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _encode_share(share) -> tuple:
    """Worker of raw x N: encode texts[start:stop] (inherited through fork) with tiktoken."""
    start, stop = share
    c0 = time.process_time()
    n = sum(len(_ENC.encode_ordinary(t)) for t in _TEXTS[start:stop])
    return n, time.process_time() - c0


_ENC, _TEXTS = None, []


def main() -> None:
    global _ENC, _TEXTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=30.0, help="corpus size in MB of text")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20, help="the tool's --chunk-bytes (its default)")
    ap.add_argument("--parts", type=int, default=4, help="corpus files; one (raw, tool) pair each")
    ap.add_argument("--repeat", type=int, default=5, help="passes over the parts per worker count")
    args = ap.parse_args()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron_qwen.data.corpus.indexed import PreprocessConfig, build_indexed_dataset
        from megatron_qwen.data.corpus.runner import JobConfig, Summary
        from megatron_qwen.tokenizer import load_tokenizer
        import megatron.core.datasets.indexed_dataset  # noqa: F401  (import time is not the job)

    texts = _TEXTS = corpus(int(args.mb * 1e6))
    nbytes = sum(len(t.encode()) for t in texts)
    _ENC = load_tokenizer()._encoding  # tiktoken's own Encoding for the Qwen vocabulary
    print(f"corpus: {len(texts):,} documents, {nbytes / 1e6:.1f} MB of real text; cores: {os.cpu_count()}")

    def raw(n_procs, lo, hi):
        """(wall s, CPU s, tokens) of raw tiktoken on texts[lo:hi] over n_procs processes."""
        if n_procs == 1:
            t0, c0 = time.perf_counter(), time.process_time()
            n, _ = _encode_share((lo, hi))
            return time.perf_counter() - t0, time.process_time() - c0, n
        bounds = [lo + (hi - lo) * i // n_procs for i in range(n_procs + 1)]
        t0 = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(n_procs) as pool:
            done = pool.map(_encode_share, list(zip(bounds, bounds[1:])))
        return time.perf_counter() - t0, sum(c for _, c in done), sum(n for n, _ in done)

    with tempfile.TemporaryDirectory() as tmp:
        # the corpus in --parts files of about equal size: each (raw, tool) pair runs on one part
        # within a second or two, so the VM's drift hits both sides of a pair alike
        cuts, acc, target = [0], 0, nbytes / args.parts
        for i, t in enumerate(texts):
            acc += len(t.encode())
            if acc >= target * len(cuts) and len(cuts) < args.parts:
                cuts.append(i + 1)
        cuts.append(len(texts))
        parts = list(zip(cuts, cuts[1:]))
        for k, (lo, hi) in enumerate(parts):
            with (Path(tmp) / f"part{k}.jsonl").open("w") as f:
                for t in texts[lo:hi]:
                    f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")

        def tool(workers, k):
            lo, hi = parts[k]
            job = JobConfig(input=[f"{tmp}/part{k}.jsonl"], workers=workers, chunk_bytes=args.chunk_bytes,
                            progress=False)
            summary = Summary("bench", job)
            cfg = PreprocessConfig(output_prefix=f"{tmp}/out{workers}", append_eod=True)
            t0, c0 = time.perf_counter(), cpu_seconds()
            build_indexed_dataset(cfg, job, summary)
            return time.perf_counter() - t0, cpu_seconds() - c0, summary.counters["tokens"] - (hi - lo)

        pairs = {w: [] for w in args.workers}
        for r in range(args.repeat):
            for w in args.workers:
                for k, (lo, hi) in enumerate(parts):
                    if (r + k) % 2:  # alternate which side goes first
                        run, base = tool(w, k), raw(w, lo, hi)
                    else:
                        base, run = raw(w, lo, hi), tool(w, k)
                    assert abs(run[2] - base[2]) <= base[2] // 1000, (run[2], base[2])  # NFC may differ
                    pairs[w].append((base, run))

    def quartiles(xs):
        xs = sorted(xs)
        return xs[len(xs) // 4], xs[len(xs) // 2], xs[(3 * len(xs)) // 4]

    walls = {}
    print(f"{len(parts)} parts x {args.repeat} repeats = {len(parts) * args.repeat} (raw, tool) pairs per worker count")
    print(f"{'setting':32s} {'tokens/s':>12s} {'tokens/CPU-s':>13s}  (totals over all pairs)")
    for w, runs in pairs.items():
        tokens = sum(base[2] for base, _ in runs)
        for name, k in ((f"raw tiktoken x {w}", 0), (f"preprocess_data.py --workers {w}", 1)):
            print(f"{name:32s} {tokens / sum(r[k][0] for r in runs):12,.0f} "
                  f"{tokens / sum(r[k][1] for r in runs):13,.0f}")
        walls[w] = tokens / sum(run[0] for _, run in runs)
        wall = sum(base[0] for base, _ in runs) / sum(run[0] for _, run in runs)
        cpu = sum(base[1] for base, _ in runs) / sum(run[1] for _, run in runs)
        q = quartiles([base[0] / run[0] for base, run in runs])
        print(f"    per worker, --workers {w} / raw x {w}: wall {wall:.2f} (pairs: median {q[1]:.2f}, "
              f"quartiles {q[0]:.2f}-{q[2]:.2f}), per CPU-second {cpu:.2f}")
    if 1 in walls:
        for w in walls:
            if w > 1:
                print(f"scaling --workers {w} vs 1 (wall): {walls[w] / walls[1]:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
