"""Worker for tests/test_train_resume.py: stop-and-resume runs against uninterrupted ones.

argv: OUT_DIR DATA_PREFIX [RUN_NAME ...]. One torchrun launch (2 gloo processes), the runs in
turn; each writes OUT_DIR/NAME.jsonl. For every layout L: ``ref_L`` trains ITERS iterations,
``stop_L`` the same flags saving to ckpt_L/ and leaving at STOP (--exit-interval), ``resume_L``
the same flags loading ckpt_L/. ``A_at_B`` loads ckpt_A/ at layout B. The ``dist_*`` layouts use the
distributed optimizer, saved ``dp_reshardable`` (the default) except ``dist_tp2``, whose save is
``--dist-ckpt-optim-fully-reshardable``; ``dist_pp2vpp2`` (two virtual stages per rank, interleaved
1F1B) saves with --async-save, at iteration 2 too (--save-interval 2), so the save at STOP starts
with a background save of iteration 2 to finalize. ``drop_tp2`` has dropout 0.1 (hidden and
attention) at TP=2. ``REFUSED`` runs load a dp_reshardable checkpoint at another layout: each must
stop with one line (OUT_DIR/NAME.error).
"""

import sys

from train_common import run_trainings

ITERS, STOP = 6, 3
DIST = ["--use-distributed-optimizer"]
LAYOUTS = {
    "dist_tp2": DIST + ["--tensor-model-parallel-size", "2"],
    "dist_dp2": DIST,
    "dist_pp2": DIST + ["--pipeline-model-parallel-size", "2"],
    "dist_pp2vpp2": DIST + ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
    "drop_tp2": ["--tensor-model-parallel-size", "2", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"],
}
SAVE_FLAGS = {"dist_tp2": ["--dist-ckpt-optim-fully-reshardable"],
              "dist_pp2vpp2": ["--async-save", "--save-interval", "2"]}
LAYOUT_CHANGES = [("dist_tp2", "dist_dp2")]  # fully_reshardable: reshards at load
REFUSED = [("dist_dp2", "dist_tp2")]  # dp_reshardable: DP=2 -> TP=2 is refused


def runs(out: str) -> dict:
    table = {}
    for name, flags in LAYOUTS.items():
        ckpt = f"{out}/ckpt_{name}"
        table[f"ref_{name}"] = flags
        table[f"stop_{name}"] = flags + SAVE_FLAGS.get(name, []) + ["--save", ckpt, "--exit-interval", str(STOP)]
        table[f"resume_{name}"] = flags + ["--load", ckpt]
    for saved, loaded in LAYOUT_CHANGES + REFUSED:
        table[f"{saved}_at_{loaded}"] = LAYOUTS[loaded] + ["--load", f"{out}/ckpt_{saved}"]
    return table


def main():
    out, data = sys.argv[1:3]
    common = ["--model.preset", "tiny_vocab", "--data-path", data, "--data-cache-path", f"{out}/cache",
              "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
              "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--log-interval", "1",
              "--num-workers", "0", "--seed", "7", "--no-exit-signal-handler", "--eod-id", "999"]
    run_trainings(common, runs(out).items(), out, only=set(sys.argv[3:]),
                  refused={f"{saved}_at_{loaded}" for saved, loaded in REFUSED})


if __name__ == "__main__":  # dist_checkpointing spawns helper processes that re-import this file
    main()
