#!/usr/bin/env python
"""Score a JSONL of conversations with a trained reward model (an export directory).

    python tools/score_reward.py --model-path RM_EXPORT --input-path convs.jsonl \
        --output-path scored.jsonl

Each input line is ``{"messages": [...]}`` ending with the assistant turn to score; each output
line is the input plus ``reward`` (and ``reward_normalized`` with the export's statistics).
Every setting: ``--help``; docs/reward_model.md.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_qwen.rlhf.reward_scoring import main  # noqa: E402

if __name__ == "__main__":
    main()
