"""Worker for tests/test_train_parallel.py: the single-process runs, one after another.

argv: OUT_DIR DATA_PREFIX. Writes OUT_DIR/{init,ref,stop,resume,nan}.jsonl metrics and the
checkpoints init_ckpt (1 iteration: the common starting weights), stop_ckpt (iteration 10),
weights_ckpt (init_ckpt converted to the weights-only form of tools/convert_checkpoint.py).
"""

import json
import sys

from megatron_qwen.config import load_config
from megatron_qwen.runtime import destroy, init_distributed
from megatron_qwen.training.config import PretrainConfig
from megatron_qwen.training.loop import TrainingStopped, train


def main():
    out, data = sys.argv[1:3]
    COMMON = ["--model.preset", "tiny_vocab", "--data-path", data, "--data-cache-path", f"{out}/cache",
              "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "20",
              "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "5", "--log-interval", "1",
              "--num-workers", "0", "--seed", "7", "--no-exit-signal-handler", "--eod-id", "999"]
    init = f"{out}/init_ckpt"
    RUNS = {
        "init": ["--train-iters", "1", "--save", init],
        "ref": ["--load", init, "--finetune"],
        "stop": ["--load", init, "--finetune", "--exit-interval", "10", "--save", f"{out}/stop_ckpt"],
        "resume": ["--load", f"{out}/stop_ckpt", "--save", f"{out}/resume_ckpt", "--keep-last-k", "1",
                   "--save-interval", "4"],
        # a learning rate that blows the weights up: every later step has a non-finite loss
        # the converter's weights-only form of init_ckpt, as a continued-pretraining start
        "pretrained": ["--pretrained-checkpoint", f"{out}/weights_ckpt", "--load", f"{out}/pre_ckpt",
                       "--save", f"{out}/pre_ckpt", "--exit-interval", "3"],
        "nan": ["--load", init, "--finetune", "--lr", "1e30", "--min-lr", "1e29", "--lr-warmup-iters", "0",
                "--clip-grad", "0", "--max-skipped-iters-in-a-row", "3"],
    }
    for name, flags in RUNS.items():
        cfg = load_config(PretrainConfig, COMMON + flags + ["--metrics-file", f"{out}/{name}.jsonl"])
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        if name == "pretrained":  # tools/convert_checkpoint.py reshard: model weights only
            from megatron_qwen.checkpoint.convert import reshard_checkpoint

            reshard_checkpoint(init, f"{out}/weights_ckpt", tp=1)
        try:
            train(cfg)
        except TrainingStopped as exc:
            print(json.dumps({"stopped": name, "message": str(exc)}), flush=True)
        print(f"done {name}", flush=True)
    destroy()


if __name__ == "__main__":  # dist_checkpointing spawns helper processes that re-import this file
    main()
