"""Worker for tests/test_mcore_versions.py: a checkpoint written under one megatron-core version,
resumed under another.

argv: OUT_DIR DATA_PREFIX write | OUT_DIR DATA_PREFIX resume FROM. ``write`` trains ``ref_V`` (ITERS
iterations, no stop) and ``stop_V`` (the same flags, saving to ckpt_V/ and leaving at STOP), V the
installed megatron-core version; ``resume FROM`` trains ``resume_FROM_in_V`` loading ckpt_FROM/.
One process, the distributed optimizer (its state is the part of a checkpoint that changed most
between versions), metrics to OUT_DIR/NAME.jsonl.
"""

import sys

from train_common import run_trainings

from megatron_qwen.runtime import mcore_version

ITERS, STOP = 4, 2


def main():
    out, data, mode = sys.argv[1:4]
    here = str(mcore_version.version())
    common = ["--model.preset", "tiny_vocab", "--data-path", data, "--data-cache-path", f"{out}/cache_{here}",
              "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(ITERS),
              "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--log-interval", "1",
              "--num-workers", "0", "--seed", "7", "--no-exit-signal-handler", "--eod-id", "999",
              "--use-distributed-optimizer", "--hidden-dropout", "0.1"]
    if mode == "write":
        runs = {f"ref_{here}": [],
                f"stop_{here}": ["--save", f"{out}/ckpt_{here}", "--exit-interval", str(STOP)]}
    else:
        source = sys.argv[4]
        runs = {f"resume_{source}_in_{here}": ["--load", f"{out}/ckpt_{source}"]}
    run_trainings(common, runs.items(), out)


if __name__ == "__main__":  # dist_checkpointing spawns helper processes that re-import this file
    main()
