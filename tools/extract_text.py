#!/usr/bin/env python
"""HTML -> main text (trafilatura) + language id (py3langid), as fields on each JSONL record.

    python tools/extract_text.py --input pages.jsonl --output text.jsonl --html-key html \
        --languages en,zh --workers 8
Each kept record gets `text`, `lang` and `lang_score`. See docs/data.md.
"""

import dataclasses

from megatron_qwen.data.corpus.extract import ExtractConfig, Extractor
from megatron_qwen.data.corpus.jsonl import ReadOptions
from megatron_qwen.data.corpus.runner import JobConfig, Summary, check_job_paths, filter_job, parse_args, run_cli


@dataclasses.dataclass
class ExtractJob:
    """Extract the main text of HTML pages and identify its language."""

    job: JobConfig = dataclasses.field(default_factory=JobConfig)
    extract: ExtractConfig = dataclasses.field(default_factory=ExtractConfig)

    def validate(self) -> None:
        check_job_paths(self.job, {"extract.output": self.extract.output, "extract.rejected": self.extract.rejected})


def main(argv=None) -> None:
    cfg = parse_args(ExtractJob, argv, ExtractJob.__doc__)
    summary = Summary("extract_text", cfg.job)
    try:
        filter_job(Extractor(cfg.extract), cfg.job, ReadOptions(required_keys=(cfg.extract.input_key,)),
                   summary, cfg.extract.output, cfg.extract.rejected)
    finally:
        summary.close()
    summary.finish(cfg.job)


if __name__ == "__main__":
    run_cli(main)
