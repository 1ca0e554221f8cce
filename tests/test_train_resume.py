"""Stop-and-resume is exact: the distributed optimizer at TP=2, DP=2, PP=2 and PP=2 with two
virtual stages per rank (saved dp_reshardable, fully_reshardable at TP=2, and with --async-save at
PP=2 x VPP=2), a layout change after a fully_reshardable save, the refusal of one after a
dp_reshardable save, and dropout on (the RNG a resumed run restores is the one an uninterrupted run
has).

One 2-process gloo launch (tests/scripts/train_resume.py): tiny model (`tiny_vocab`), 6 iterations,
a save at iteration 3 by --exit-interval, then --load to the end, next to the same run without a
stop. Same layout: every resumed loss, grad norm and LR to the last bit. Another layout: the
losses of test_train_parallel's tolerance (only the order of float sums changes).
"""

import sys

import pytest

from tests.dist import REPO, run_torchrun

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from train_common import read_metrics, write_corpus  # noqa: E402
from train_resume import ITERS, LAYOUT_CHANGES, LAYOUTS, REFUSED, STOP  # noqa: E402

TOL = 1e-5  # relative, per iteration (as tests/test_train_parallel.py)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_resume")
    write_corpus(str(out / "toy"), vocab_size=1000)
    log = run_torchrun(REPO / "tests/scripts/train_resume.py", str(out), str(out / "toy"), timeout=600)
    assert log.count(f"exiting at iteration {STOP} (--exit-interval {STOP}) after saving") == len(LAYOUTS)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_is_bitwise_identical_to_uninterrupted_run(out, layout):
    ref, stop, resumed = (read_metrics(out / f"{run}_{layout}.jsonl") for run in ("ref", "stop", "resume"))
    assert [r["iteration"] for r in ref] == list(range(1, ITERS + 1))
    assert [r["iteration"] for r in stop] == list(range(1, STOP + 1))
    assert [r["iteration"] for r in resumed] == list(range(STOP + 1, ITERS + 1))
    for a, b in zip(ref[STOP:], resumed):
        assert (a["lm_loss"], a["grad_norm"], a["lr"]) == (b["lm_loss"], b["grad_norm"], b["lr"]), a["iteration"]
    assert ref[-1]["lm_loss"] < ref[0]["lm_loss"]  # it trains: not a comparison of frozen weights


@pytest.mark.parametrize("saved,loaded", LAYOUT_CHANGES)
def test_distributed_optimizer_resumes_at_another_layout(out, saved, loaded):
    ref = read_metrics(out / f"ref_{saved}.jsonl")
    resumed = read_metrics(out / f"{saved}_at_{loaded}.jsonl")
    assert [r["iteration"] for r in resumed] == list(range(STOP + 1, ITERS + 1))
    for a, b in zip(ref[STOP:], resumed):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=TOL), a["iteration"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["iteration"]


def test_each_save_wrote_the_optimizer_form_asked_for(out):
    """The default is dp_reshardable; --dist-ckpt-optim-fully-reshardable gives fully_reshardable
    (what the resumes above read back is what was written, as the checkpoint records it)."""
    from megatron_qwen.checkpoint.safe_load import load_common

    for layout in ("dist_tp2", "dist_dp2", "dist_pp2", "dist_pp2vpp2"):
        content = load_common(out / f"ckpt_{layout}" / f"iter_{STOP:07d}")["content_metadata"]
        want = "fully_reshardable" if layout == "dist_tp2" else "dp_reshardable"
        assert content["distrib_optim_sharding_type"] == want, layout


def test_async_saves_are_published_complete_and_in_order(out):
    """--async-save with --save-interval 2 and a stop at 3: both background saves were finalized
    (metadata.json written, renamed from .tmp), the tracker names the last one."""
    root = out / "ckpt_dist_pp2vpp2"
    assert sorted(p.name for p in root.iterdir()) == [
        "config.yaml", "iter_0000002", f"iter_{STOP:07d}", "latest_checkpointed_iteration.txt"]
    assert all((root / name / "metadata.json").is_file() for name in ("iter_0000002", f"iter_{STOP:07d}"))
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(STOP)


@pytest.mark.parametrize("saved,loaded", REFUSED)
def test_dp_reshardable_checkpoint_at_another_layout_is_refused_in_one_line(out, saved, loaded):
    error = (out / f"{saved}_at_{loaded}.error").read_text()
    assert "\n" not in error
    assert error == (
        f"--load {out}/ckpt_{saved}: iter_{STOP:07d} holds the distributed optimizer as "
        "dp_reshardable, saved at TP=1 PP=1 VPP=1 DP=2, and this run is TP=2 PP=1 VPP=1 DP=1; "
        "resume at the saved layout and save again with --dist-ckpt-optim-fully-reshardable to "
        "change it (or pass --no-load-optim)")
