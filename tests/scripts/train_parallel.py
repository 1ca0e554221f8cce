"""Worker for tests/test_train_parallel.py: one torchrun launch, several layouts in turn.

argv: OUT_DIR DATA_PREFIX INIT_CKPT RESUME_CKPT [RUN_NAME ...]. Every run starts from INIT_CKPT's weights
(--finetune: fresh optimizer, iteration 0) so that each layout starts from the same model;
the resume runs continue RESUME_CKPT (a single-process run stopped at iteration 10) at a new layout.
Launched with 2 processes it runs LAYOUTS, with 4 the combined layouts of LAYOUTS_4.
"""

import os
import sys

from train_common import run_trainings


def main():
    out, data, init_ckpt, resume_ckpt = sys.argv[1:5]

    COMMON = ["--model.preset", "tiny_vocab", "--data-path", data, "--data-cache-path", f"{out}/cache",
              "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "20",
              "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "5", "--log-interval", "1",
              "--num-workers", "0", "--seed", "7", "--no-exit-signal-handler", "--eod-id", "999"]

    LAYOUTS = {
        "tp2": ["--tensor-model-parallel-size", "2"],
        "pp2": ["--pipeline-model-parallel-size", "2"],
        "dp2": ["--use-distributed-optimizer"],
        # per-token loss: DDP sums the gradients and megatron-core divides by the global token count
        "dp2pertoken": ["--use-distributed-optimizer", "--calculate-per-token-loss"],
        "pp2vpp2": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
        "dp2overlap": ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
                       "--save", f"{out}/overlap_ckpt"],
    }
    # 4 processes: TP x PP and TP x DP (with sequence parallelism and the distributed optimizer)
    LAYOUTS_4 = {
        "tp2pp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
        "tp2dp2sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer"],
    }
    # and resume the single-process checkpoint (plain optimizer) at other layouts
    if int(os.environ["WORLD_SIZE"]) == 4:
        runs = [(name, flags + ["--load", init_ckpt, "--finetune"]) for name, flags in LAYOUTS_4.items()]
        runs += [("resume_tp2pp2", LAYOUTS_4["tp2pp2"] + ["--load", resume_ckpt])]
    else:
        runs = [(name, flags + ["--load", init_ckpt, "--finetune"]) for name, flags in LAYOUTS.items()]
        resume = {"tp2": LAYOUTS["tp2"], "pp2": LAYOUTS["pp2"], "dp2": []}
        runs += [(f"resume_{name}", flags + ["--load", resume_ckpt]) for name, flags in resume.items()]

    run_trainings(COMMON, runs, out, only=set(sys.argv[5:]))


if __name__ == "__main__":  # dist_checkpointing spawns helper processes that re-import this file
    main()
