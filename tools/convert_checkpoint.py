#!/usr/bin/env python
"""Convert Qwen checkpoints: Hugging Face <-> megatron-core torch_dist, and reshard TP/PP.

    python tools/convert_checkpoint.py hf-to-mcore --hf Qwen-7B --out ckpt/qwen7b --tp 2 --pp 2
    python tools/convert_checkpoint.py mcore-to-hf --mcore ckpt/qwen7b --out hf/qwen7b
    python tools/convert_checkpoint.py reshard --mcore ckpt/qwen7b --out ckpt/qwen7b_tp1 --tp 1 --pp 1

See docs/checkpoints.md; the logic lives in megatron_qwen/checkpoint/.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_qwen.checkpoint.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
