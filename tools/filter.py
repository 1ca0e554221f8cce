#!/usr/bin/env python
"""Rule-based quality filters (Gopher's rules, CJK-aware), each removal counted per rule.

    python tools/filter.py --input text.jsonl --output good.jsonl --rejected bad.jsonl \
        --min-words 50 --disable top_ngram --workers 8
Thresholds are flags or the `filter:` group of a YAML given with --config. See docs/data.md.
"""

import dataclasses

from megatron_qwen.data.corpus.filters import FilterConfig, QualityFilter
from megatron_qwen.data.corpus.jsonl import ReadOptions
from megatron_qwen.data.corpus.runner import JobConfig, Summary, check_job_paths, filter_job, parse_args, run_cli


@dataclasses.dataclass
class FilterJob:
    """Keep the documents that pass the quality rules; count each removal by rule."""

    job: JobConfig = dataclasses.field(default_factory=JobConfig)
    filter: FilterConfig = dataclasses.field(default_factory=FilterConfig)

    def validate(self) -> None:
        check_job_paths(self.job, {"filter.output": self.filter.output, "filter.rejected": self.filter.rejected})


def main(argv=None) -> None:
    cfg = parse_args(FilterJob, argv, FilterJob.__doc__)
    summary = Summary("filter", cfg.job)
    try:
        filter_job(QualityFilter(cfg.filter), cfg.job, ReadOptions(required_keys=(cfg.filter.text_key,)),
                   summary, cfg.filter.output, cfg.filter.rejected)
    finally:
        summary.close()
    summary.finish(cfg.job)


if __name__ == "__main__":
    run_cli(main)
