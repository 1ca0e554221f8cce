#!/usr/bin/env python
"""Pretrain (or fine-tune) Qwen on megatron-core: ``torchrun ... pretrain_qwen.py --config R.yaml``."""

from megatron_qwen.train import main

if __name__ == "__main__":
    main()
