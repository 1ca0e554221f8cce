#!/usr/bin/env python
"""Generate text, or chat in ChatML, from a megatron-core Qwen checkpoint (KV cache on).

    python tools/generate.py --load ckpt/qwen7b --prompt "The capital of France is" --max-new-tokens 32
    python tools/generate.py --load ckpt/qwen7b-chat --input prompts.jsonl --output out.jsonl --top-p 0.8 --temperature 0.7
    python tools/generate.py --load ckpt/qwen7b-chat --chat

See docs/inference.md; the logic lives in megatron_qwen/inference/chat.py.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_qwen.inference.chat import main  # noqa: E402

if __name__ == "__main__":
    main()
