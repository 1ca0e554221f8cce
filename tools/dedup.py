#!/usr/bin/env python
"""Deduplicate JSONL corpora: exact (normalised text) or MinHash-LSH fuzzy, first occurrence kept.

    python tools/dedup.py --method exact   --input a.jsonl b.jsonl --output dedup.jsonl
    python tools/dedup.py --method minhash --input a.jsonl --output dedup.jsonl \\
        --threshold 0.8 --num-perm 128 --shingle auto --verify --workers 8

Writes the kept records (in input order), a report of removed records (--report, default
OUTPUT.duplicates.jsonl) and optionally the removed records (--removed). See docs/dedup.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_qwen.data.corpus import dedup  # noqa: E402
from megatron_qwen.data.corpus.runner import parse_args, run_cli  # noqa: E402


def main() -> None:
    cfg = parse_args(dedup.DedupToolConfig, description=__doc__)
    dedup.run(cfg)


if __name__ == "__main__":
    run_cli(main)
