#!/usr/bin/env python
"""Peak GPU memory of a recipe, by component, and whether it fits: before anything launches.

    tools/plan_memory.py --config examples/ppo_7b.yaml --nodes 4 --gpu-memory-gib 80
    tools/plan_memory.py --config examples/rm_pmp_14b.yaml --world-size 16 --gpu-memory-gib 80 \\
        --model-preset qwen_14b            # the HF directory is not there yet

Every trainer flag works as an override (``--micro-batch-size 1``). docs/memory.md.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_qwen.memory_plan.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
