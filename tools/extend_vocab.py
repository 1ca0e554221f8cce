#!/usr/bin/env python
"""Extend a tiktoken vocabulary (cl100k_base by default) with BPE merges learnt on a corpus.

    python tools/extend_vocab.py --corpus zh.jsonl --num-new-tokens 20000 \\
        --output qwen_like.tiktoken --heldout heldout.jsonl [--base FILE] [--text-key text]

The result loads with ``megatron_qwen.tokenizer.load_tokenizer(OUTPUT)``. See docs/tokenizer.md.
"""

import sys

from megatron_qwen.config import load_config
from megatron_qwen.data.corpus.jsonl import CorpusError
from megatron_qwen.data.corpus.runner import describe_os_error
from megatron_qwen.tokenizer.extend import VocabExtensionConfig, extend_vocabulary


def main(argv=None) -> None:
    cfg = load_config(VocabExtensionConfig, argv, description=__doc__)
    try:
        extend_vocabulary(cfg.vocab)
    except OSError as exc:
        raise SystemExit(f"error: {describe_os_error(exc)}")
    except (ValueError, CorpusError) as exc:
        raise SystemExit(f"error: {exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
