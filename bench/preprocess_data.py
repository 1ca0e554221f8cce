#!/usr/bin/env python
"""preprocess_data.py throughput vs raw tiktoken encoding of the same text.

Builds a JSONL corpus of real text found on this machine (the Qwen report seeds if present,
CPython's standard-library sources and docs, the test corpus), then times, on the same
documents (cut at blank lines to a few KB each, like web pages): (1) tiktoken's ``encode_ordinary`` on one thread, texts already in memory: the
ceiling; (2) the whole tool on 1 worker: read + JSON parse + encode + megatron-core writer;
(3) the tool on N workers. Prints tokens/s and the ratios.

    python bench/preprocess_data.py [--mb 8] [--workers 1 2] [--repeat 5] [--chunk-bytes 262144]
"""

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    texts = []
    seeds = Path("/work/shared/seeds")
    if seeds.is_dir():
        texts += [p.read_text(errors="replace") for p in sorted(seeds.glob("*.txt"))]
    texts += [json.loads(x)["text"] for x in (REPO / "tests/data/multilingual.jsonl").read_text().splitlines()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.rglob("*.py")):
        if sum(map(len, texts)) >= limit_bytes:
            break
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return [d for t in texts for d in as_documents(t)]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size in MB of text")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk-bytes", type=int, default=256 << 10, help="the tool's --chunk-bytes")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved repeats per worker count")
    args = ap.parse_args()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron_qwen.data.corpus.indexed import PreprocessConfig, build_indexed_dataset
        from megatron_qwen.data.corpus.runner import JobConfig, Summary
        from megatron_qwen.tokenizer import load_tokenizer
        import megatron.core.datasets.indexed_dataset  # noqa: F401  (import time is not the job)

    texts = corpus(int(args.mb * 1e6))
    nbytes = sum(len(t.encode()) for t in texts)
    tok = load_tokenizer()
    enc = tok._encoding  # raw tiktoken Encoding: the ceiling
    print(f"corpus: {len(texts):,} documents, {nbytes / 1e6:.1f} MB of real text; cores: {os.cpu_count()}")

    def raw():
        t0, c0 = time.perf_counter(), cpu_seconds()
        n = sum(len(enc.encode_ordinary(t)) for t in texts)
        return time.perf_counter() - t0, cpu_seconds() - c0, n

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        with src.open("w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")

        def tool(workers):
            job = JobConfig(input=[str(src)], workers=workers, chunk_bytes=args.chunk_bytes, progress=False)
            summary = Summary("bench", job)
            cfg = PreprocessConfig(output_prefix=f"{tmp}/out{workers}", append_eod=True)
            t0, c0 = time.perf_counter(), cpu_seconds()
            build_indexed_dataset(cfg, job, summary)
            return time.perf_counter() - t0, cpu_seconds() - c0, summary.counters["tokens"] - len(texts)

        # interleaved repeats: each tool run is compared with the raw run just before it, so a
        # change in machine load between runs does not turn into a ratio
        rows = {w: [] for w in args.workers}
        raws = []
        for _ in range(args.repeat):
            for w in args.workers:
                base = raw()
                run = tool(w)
                assert abs(run[2] - base[2]) <= base[2] // 1000, (run[2], base[2])  # NFC may differ
                raws.append(base)
                rows[w].append((base, run))

    # best of the interleaved runs: on a shared machine the fastest run is the one least
    # disturbed by other work, for the raw encoder and the tool alike
    raw_s = min(r[0] for r in raws)
    raw_cpu = min(r[1] for r in raws)
    raw_tokens = raws[0][2]
    print(f"raw tiktoken encode_ordinary, 1 thread: {raw_tokens / raw_s:11,.0f} tokens/s  "
          f"{raw_tokens / raw_cpu:11,.0f} tokens/CPU-s  ({nbytes / raw_s / 1e6:.2f} MB/s)   best of {len(raws)}")
    walls = {}
    for w, pairs in rows.items():
        dt = min(run[0] for _, run in pairs)
        cpu = min(run[1] for _, run in pairs)
        tokens = pairs[0][1][2]
        walls[w] = tokens / dt
        print(f"preprocess_data.py --workers {w}:      {tokens / dt:11,.0f} tokens/s  {tokens / cpu:11,.0f} tokens/CPU-s  "
              f"({nbytes / dt / 1e6:.2f} MB/s, {len(texts) / dt:,.0f} docs/s)   best of {len(pairs)}")
        print(f"    ratio to raw: wall {tokens / dt / (raw_tokens / raw_s):.2f}, "
              f"per CPU-second (the per-worker figure) {tokens / cpu / (raw_tokens / raw_cpu):.2f}")
    if 1 in walls:
        for w in walls:
            if w > 1:
                print(f"scaling --workers {w} vs 1 (wall): {walls[w] / walls[1]:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
