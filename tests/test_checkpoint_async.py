"""--async-save is atomic: a background save becomes ``latest`` only at its finalize, and one
aborted after an error is never published (one process, the trainer's save/load functions; the
2-process bitwise resume from async saves is in test_train_resume.py)."""

import pytest

from megatron_qwen.config import load_config
from megatron_qwen.runtime import destroy, init_distributed
from megatron_qwen.training import checkpoint as ckpt
from megatron_qwen.training.config import PretrainConfig


@pytest.fixture()
def trainer(tmp_path):
    from megatron_qwen.training.loop import Trainer

    cfg = load_config(PretrainConfig, ["--model.preset", "tiny_vocab", "--num-layers", "2",
                                       "--micro-batch-size", "1", "--global-batch-size", "1",
                                       "--train-iters", "1", "--use-distributed-optimizer",
                                       "--save", str(tmp_path / "ck"), "--async-save", "--data-path", "x"])
    init_distributed(cfg.parallel, seed=1)
    try:
        yield cfg, Trainer(cfg)
    finally:
        ckpt.abort_async_saves()
        destroy()


def test_an_async_save_is_latest_only_after_its_finalize_and_never_after_an_abort(tmp_path, trainer):
    cfg, t = trainer
    root = tmp_path / "ck"

    def save(iteration):
        ckpt.save_checkpoint(root, iteration, t.model, t.optimizer, t.scheduler, iteration, cfg)

    save(1)
    ckpt.finalize_async_saves(blocking=True)
    assert ckpt.read_tracker(root) == 1
    save(2)  # handed to the writer: not published, whether or not the writer is done yet
    assert ckpt.read_tracker(root) == 1 and (root / "iter_0000002.tmp").is_dir()
    assert not (root / "iter_0000002").exists()
    writers = [call.async_caller for call in ckpt._async_queue.async_calls]
    ckpt.abort_async_saves()  # the run failed: the writer is killed, the save stays unpublished
    assert all(w.process is None for w in writers)
    ckpt.finalize_async_saves(blocking=True)
    assert ckpt.read_tracker(root) == 1 and not (root / "iter_0000002").exists()
    save(3)
    ckpt.finalize_async_saves(blocking=True)
    assert ckpt.read_tracker(root) == 3 and (root / "iter_0000003" / "metadata.json").is_file()
    assert ckpt.load_checkpoint(root, t.model, t.optimizer, t.scheduler, cfg) == (3, 3)
