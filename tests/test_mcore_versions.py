"""The newest supported megatron-core (0.19.x, `make test-mcore-latest`) next to the default one.

Run from the 0.19 side, with the 0.16.1 venv as the other interpreter (``MEGATRON_QWEN_OTHER_PYTHON``,
which the make target sets; by default the repo's ``.venv``): a training checkpoint written under
each version resumes under the other to the last bit of every loss, grad norm and LR (distributed
optimizer, dropout on: model, optimizer, scheduler and RNG all cross). Under 0.16.1 (`make test`)
these tests are skipped: the 0.19 side runs both directions.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_qwen.runtime import mcore_version
from tests.dist import REPO

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from train_common import read_metrics, write_corpus  # noqa: E402
from train_versions import ITERS, STOP  # noqa: E402

pytestmark = pytest.mark.skipif(not mcore_version.at_least("0.19"),
                                reason="runs under `make test-mcore-latest` (megatron-core 0.19.x), "
                                       "which checks both directions against this venv")
OTHER = Path(os.environ.get("MEGATRON_QWEN_OTHER_PYTHON", REPO / ".venv" / "bin" / "python"))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _python_version(python) -> str:
    proc = subprocess.run([str(python), "-c", "from importlib.metadata import version; "
                           "print(version('megatron-core'))"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def _run(python, *args):
    proc = subprocess.run([str(python), str(REPO / "tests/scripts/train_versions.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not OTHER.is_file():
        pytest.fail(f"{OTHER}: the megatron-core 0.16.1 venv is missing (`make venv` builds it)")
    here, other = str(mcore_version.version()), _python_version(OTHER)
    assert other.startswith("0.16."), f"{OTHER} has megatron-core {other}, expected 0.16.x"
    out = tmp_path_factory.mktemp("mcore_versions")
    write_corpus(str(out / "toy"), vocab_size=1000)
    log = ""
    for python in (sys.executable, OTHER):
        log += _run(python, out, out / "toy", "write")
    log += _run(sys.executable, out, out / "toy", "resume", other)
    log += _run(OTHER, out, out / "toy", "resume", here)
    return out, here, other, log


def test_the_other_side_writes_its_own_checkpoint_format(runs):
    """0.16 keeps the common state in common.pt, 0.19 inside the torch_dist checkpoint: the
    cross-version loads below really read the other format."""
    out, here, other, _ = runs
    assert (out / f"ckpt_{other}" / f"iter_{STOP:07d}" / "common.pt").is_file()
    assert not (out / f"ckpt_{here}" / f"iter_{STOP:07d}" / "common.pt").exists()


@pytest.mark.parametrize("direction", ["0.16_to_0.19", "0.19_to_0.16"])
def test_checkpoint_resumes_bitwise_under_the_other_version(runs, direction):
    out, here, other, log = runs
    writer, reader = (other, here) if direction == "0.16_to_0.19" else (here, other)
    assert f"resumed from {out / f'ckpt_{writer}' / f'iter_{STOP:07d}'}: iteration {STOP}" in log
    ref = read_metrics(out / f"ref_{writer}.jsonl")
    resumed = read_metrics(out / f"resume_{writer}_in_{reader}.jsonl")
    assert [r["iteration"] for r in resumed] == list(range(STOP + 1, ITERS + 1))
    for a, b in zip(ref[STOP:], resumed):  # same loss, grad norm and LR to the last bit
        assert (a["lm_loss"], a["grad_norm"], a["lr"]) == (b["lm_loss"], b["grad_norm"], b["lr"])


def test_both_versions_train_the_same_curve(runs):
    """The tiny model's numerics did not move between the versions (same code path on CPU)."""
    out, here, other, _ = runs
    assert ([r["lm_loss"] for r in read_metrics(out / f"ref_{here}.jsonl")]
            == [r["lm_loss"] for r in read_metrics(out / f"ref_{other}.jsonl")])


def test_paged_stash_stand_in_serves_megatron_core_without_triton():
    """0.19 imports Triton in one module; without Triton the stand-in serves that module and
    torch still sees no Triton (a fake top-level `triton` would make torch try to use it)."""
    import importlib.util

    import megatron.core  # noqa: F401
    import torch.utils._triton

    stand_in = sys.modules[mcore_version.PAGED_STASH_KERNELS]
    if importlib.util.find_spec("triton") is not None:
        assert not getattr(stand_in, "__megatron_qwen_stand_in__", False)
        return
    assert stand_in.__megatron_qwen_stand_in__ and stand_in.GLOBAL_BLOCK_SIZE == 1024
    assert not torch.utils._triton.has_triton()
    with pytest.raises(RuntimeError, match="needs Triton"):
        stand_in.paged_stash_copy_kernel()
