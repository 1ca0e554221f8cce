"""Worker for tests/test_rm_train.py: reward-model trainings under the current process count.

    torchrun --nproc-per-node N rm_train_check.py DATA_DIR MODEL_DIR OUT_DIR STAGES [--resume]
        [--dropout-model DIR]

Trains once per ZeRO stage in STAGES (comma-separated) through the real entry point. With
--resume the last stage's run also saves a checkpoint half-way, and a second run resumes from it
(into another directory) to the end: its losses must continue the uninterrupted run's.
With --dropout-model (the same weights with attention dropout on) a ZeRO-2 run of DROPOUT_STEPS
saves at step DROPOUT_SAVE and a second run resumes from it: with every RNG restored, its losses
must be the uninterrupted run's, bit for bit. Rank 0 writes OUT_DIR/results_wN.json.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_qwen.rlhf.reward_trainer import main

EPOCHS, GLOBAL_BATCH, MICRO, LR = 2, 32, 8, "2e-3"
DROPOUT_STEPS, DROPOUT_SAVE = 6, 3


def run(data_dir: Path, model_dir: Path, out: Path, stage: int, *extra: str) -> dict:
    argv = ["--model-path", str(model_dir),
            "--train-data-path", str(data_dir / "pairs_train.jsonl"),
            "--test-data-path", str(data_dir / "pairs_test.jsonl"),
            "--seq-length", "96", "--lr", LR, "--clip-grad", "1.0",
            "--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", str(MICRO),
            "--epochs", str(EPOCHS), "--seed", "7", "--zero-stage", str(stage),
            "--log-interval", "6", "--save", str(out), *extra]
    summary = main(argv)
    return {"final": summary["final"], "losses": [h["loss"] for h in summary["history"]],
            "grad_norms": [h["grad_norm"] for h in summary["history"]],
            "steps": summary["steps"], "export_dir": summary["export_dir"],
            "train_data": summary["train_data"]}


def main_() -> None:
    data_dir, model_dir, out_dir, stages = (Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),
                                            [int(s) for s in sys.argv[4].split(",")])
    resume = "--resume" in sys.argv
    n_train = sum(1 for _ in open(data_dir / "pairs_train.jsonl"))
    half = EPOCHS * (n_train // GLOBAL_BATCH) // 2
    results = {}
    for stage in stages:
        extra = ("--save-interval", str(half)) if resume and stage == stages[-1] else ()
        results[f"zero{stage}"] = run(data_dir, model_dir, out_dir / f"zero{stage}", stage, *extra)
    world = dist.get_world_size()
    if resume:
        stage = stages[-1]
        resumed = run(data_dir, model_dir, out_dir / f"resumed_zero{stage}", stage,
                      "--load", str(out_dir / f"zero{stage}"), "--ckpt-step", str(half))
        results["resume"] = {"stage": stage, "half": half, "resumed": resumed}
    if "--dropout-model" in sys.argv:
        dropout_model = Path(sys.argv[sys.argv.index("--dropout-model") + 1])
        short = ("--train-iters", str(DROPOUT_STEPS))
        full = run(data_dir, dropout_model, out_dir / "dropout", 2, *short, "--save-interval", str(DROPOUT_SAVE))
        resumed = run(data_dir, dropout_model, out_dir / "dropout_resumed", 2, *short,
                      "--load", str(out_dir / "dropout"), "--ckpt-step", str(DROPOUT_SAVE))
        results["dropout"] = {"save": DROPOUT_SAVE, "full": full, "resumed": resumed}
    if dist.get_rank() == 0:
        (out_dir / f"results_w{world}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main_()
