#!/usr/bin/env python
"""Remove samples sharing a 13-gram (normalised words; characters for CJK) with a test set.

    python tools/decontaminate.py --input sft.jsonl --output clean.jsonl \
        --benchmark gsm8k=gsm8k_test.jsonl --benchmark mmlu=mmlu_test.jsonl \
        --benchmark-key question answer --text-key messages --ngram 13
The summary counts removals per benchmark (reason benchmark:NAME). See docs/data.md.
"""

import dataclasses
import sys

from megatron_qwen.data.corpus.decontaminate import DecontaminateConfig, Decontaminator, build_index
from megatron_qwen.data.corpus.jsonl import ReadOptions
from megatron_qwen.data.corpus.runner import JobConfig, Summary, check_job_paths, filter_job, parse_args, run_cli


@dataclasses.dataclass
class DecontaminateJob:
    """Drop training samples that overlap benchmark test sets."""

    job: JobConfig = dataclasses.field(default_factory=JobConfig)
    decontaminate: DecontaminateConfig = dataclasses.field(default_factory=DecontaminateConfig)

    def validate(self) -> None:
        d = self.decontaminate
        benchmarks = {f"decontaminate.benchmark[{i}]": spec.partition("=")[2] or spec
                      for i, spec in enumerate(d.benchmark)}
        check_job_paths(self.job, {"decontaminate.output": d.output, "decontaminate.rejected": d.rejected},
                        benchmarks)


def main(argv=None) -> None:
    cfg = parse_args(DecontaminateJob, argv, DecontaminateJob.__doc__)
    index = build_index(cfg.decontaminate)
    for name, n in sorted(index.items.items()):
        print(f"benchmark {name}: {n:,} items indexed, {index.too_short[name]:,} texts too short "
              f"(< {cfg.decontaminate.min_ngram} tokens)", file=sys.stderr)
    if index.skips.total:
        print(f"benchmark lines skipped: {dict(index.skips.counts)}; first: "
              f"{next(iter(index.skips.places.values()))[0]}", file=sys.stderr)
    summary = Summary("decontaminate", cfg.job)
    read = ReadOptions(required_keys=tuple(cfg.decontaminate.text_key), strings=False)
    try:
        filter_job(Decontaminator(cfg.decontaminate, index), cfg.job, read, summary,
                   cfg.decontaminate.output, cfg.decontaminate.rejected)
    finally:
        summary.close()
    summary.finish(cfg.job)


if __name__ == "__main__":
    run_cli(main)
