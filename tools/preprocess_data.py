#!/usr/bin/env python
"""JSONL -> megatron-core indexed dataset with the Qwen tokenizer (Megatron-LM's flags).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/web \
        --json-keys text --append-eod --workers 8
writes data/web_text_document.bin/.idx. See docs/data.md.
"""

import dataclasses

from megatron_qwen.data.corpus.indexed import PreprocessConfig, build_indexed_dataset, output_paths
from megatron_qwen.data.corpus.runner import JobConfig, Summary, check_job_paths, parse_args, run_cli


@dataclasses.dataclass
class PreprocessJob:
    """Tokenize JSONL documents into megatron-core indexed datasets ({prefix}_{key}_document)."""

    job: JobConfig = dataclasses.field(default_factory=JobConfig)
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)

    def validate(self) -> None:
        p = self.preprocess
        outputs = {f"preprocess.output_prefix[{key}{path[-4:]}]": path
                   for key in p.json_keys for path in output_paths(p.output_prefix, key)}
        check_job_paths(self.job, outputs)


def main(argv=None) -> None:
    cfg = parse_args(PreprocessJob, argv, PreprocessJob.__doc__)
    summary = Summary("preprocess_data", cfg.job)
    try:
        build_indexed_dataset(cfg.preprocess, cfg.job, summary)
    finally:
        summary.close()
    summary.finish(cfg.job)


if __name__ == "__main__":
    run_cli(main)
