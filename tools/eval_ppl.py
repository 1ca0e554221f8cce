#!/usr/bin/env python
"""Perplexity at several context lengths with dynamic NTK / LogN / window attention (report Table 3).

    python tools/eval_ppl.py --load ckpt/qwen7b --data arxiv.jsonl --seq-lengths 1024,2048,4096,8192,16384
    torchrun --nproc-per-node 4 tools/eval_ppl.py --load ckpt/qwen7b --data arxiv_text_document \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --combinations all

See docs/long_context.md; the logic lives in megatron_qwen/inference/perplexity.py.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_qwen.inference.perplexity import main  # noqa: E402

if __name__ == "__main__":
    main()
