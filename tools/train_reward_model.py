#!/usr/bin/env python
"""Train a Qwen reward model (PMP or fine-tuning) on comparison pairs with DeepSpeed ZeRO.

    deepspeed --num_gpus 8 tools/train_reward_model.py --config examples/rm_pmp_7b.yaml
    torchrun --nproc-per-node 2 tools/train_reward_model.py --config examples/rm_tiny_cpu.yaml

Every setting: ``--help``; docs/reward_model.md.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_qwen.rlhf.reward_trainer import main  # noqa: E402

if __name__ == "__main__":
    main()
