"""Worker for tests/test_sft_train.py: the SFT run of sft_single.py at TP=2, then at PP=2, then
stop-and-resume with dropout on.

argv: OUT_DIR ITERS SAMPLES. Same data, base checkpoint, flags and micro-batches as the single
process 'learn' run; writes OUT_DIR/{tp2,pp2}.jsonl metrics. With dropout 0.1 at TP=2: drop_ref
runs ITERS iterations, drop_stop the same saving at ITERS/2 (--exit-interval), drop_resume loads
that and runs to the end (OUT_DIR/drop_*.jsonl).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_single import sft_flags  # noqa: E402

from megatron_qwen.config import load_config  # noqa: E402
from megatron_qwen.runtime import destroy, init_distributed  # noqa: E402
from megatron_qwen.tokenizer.qwen import QwenTokenizer  # noqa: E402
from megatron_qwen.training.config import PretrainConfig  # noqa: E402
from megatron_qwen.training.loop import train  # noqa: E402


def main():
    out, iters, samples = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    flags = sft_flags(out, QwenTokenizer(out / "small.tiktoken").vocab_size) + [
        "--train-iters", iters, "--micro-batch-size", "1", "--global-batch-size", samples]
    tp2 = ["--tensor-model-parallel-size", "2"]
    dropout = tp2 + ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    ckpt = str(out / "drop_ckpt")
    for name, layout in {"tp2": tp2, "pp2": ["--pipeline-model-parallel-size", "2"],
                         "drop_ref": dropout,
                         "drop_stop": dropout + ["--save", ckpt, "--exit-interval", str(int(iters) // 2)],
                         "drop_resume": dropout + ["--load", ckpt]}.items():
        cfg = load_config(PretrainConfig, flags + layout + ["--metrics-file", str(out / f"{name}.jsonl")])
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        train(cfg)
        torch.distributed.barrier()
    destroy()


if __name__ == "__main__":  # dist_checkpointing spawns helper processes that re-import this file
    main()
