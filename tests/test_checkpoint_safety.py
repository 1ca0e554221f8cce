"""Hostile and broken checkpoints through the real loaders: nothing planted runs, names read from a
checkpoint stay inside it, a --load that is not a checkpoint is an error, and each failure is one
line naming the file.

The payloads (tests/checkpoint_payloads.py) write a marker file when unpickled by a loader that
runs code; before this module's fixes every loader here wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import checkpoint_payloads as plant
from tests.dist import REPO

sys.path.insert(0, str(REPO / "tests" / "scripts"))
import rm_fixtures  # noqa: E402
from train_common import write_corpus  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
pytestmark = pytest.mark.timeout(600)


def _pretrain_flags(root: Path) -> list:
    # tiny_vocab's shape with the recipe's pinned 151,936 embedding rows (a YAML field outranks a
    # preset): a save slow enough for the save-helper test to catch its processes
    return ["--config", REPO / "examples/pretrain_tiny.yaml", "--model.preset", "tiny_vocab",
            "--data-path", root / "toy", "--eod-id", 999, "--split", "1,0,0",
            "--data-cache-path", root / "cache", "--tensorboard-dir", "none",
            "--micro-batch-size", 2, "--global-batch-size", 4, "--log-interval", 1,
            "--eval-interval", "none", "--train-iters", 1]


def _run(*argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=ENV)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The last stderr line, which must be the one-line error (no traceback before it)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stderr.strip().splitlines()[-1]


def _exit_line(main, argv, capsys) -> str:
    """An entry point's main() in this process (each builds no more than a tiny model): it must
    stop with exit status 2 or an ``error: ...`` line, printed or as the exit message."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    code = exc.value.code
    line = code if isinstance(code, str) else err.splitlines()[-1]
    assert "\n" not in line and line.startswith("error: "), (code, err[-2000:])
    return line


def _pretrain(argv, capsys) -> str:
    from megatron_qwen.train import main

    return _exit_line(main, argv, capsys)


def _convert(argv, capsys) -> str:
    from megatron_qwen.checkpoint.cli import main

    return _exit_line(main, argv, capsys)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 1-iteration training checkpoint of the tiny toy-vocabulary model (the trainer's layout:
    model, optimizer, RNG byte items, common.pt)."""
    root = tmp_path_factory.mktemp("safety")
    write_corpus(str(root / "toy"), vocab_size=1000, max_docs=20)
    proc = _run(REPO / "pretrain_qwen.py", *_pretrain_flags(root), "--save", root / "ckpt",
                "--load", root / "ckpt", cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def _planted(trained: Path, tmp_path: Path, planter) -> tuple[Path, Path, Path]:
    ckpt = plant.copy_checkpoint(trained / "ckpt", tmp_path / "ckpt")
    marker = tmp_path / "MARKER"
    return ckpt, planter(ckpt, marker), marker


# --------------------------------------------------------------------------- item 1: no code runs


@pytest.mark.parametrize("planter", [plant.plant_metadata, plant.plant_common, plant.plant_byte_item])
def test_pretrain_load_runs_no_code(trained, tmp_path, planter, capsys):
    ckpt, planted, marker = _planted(trained, tmp_path, planter)
    line = _pretrain([*_pretrain_flags(trained), "--save", "none", "--load", ckpt], capsys)
    assert not marker.exists()
    assert line.startswith(f"error: {planted}: refuses to load ") and "exec" in line, line


def test_pretrained_checkpoint_runs_no_code(trained, tmp_path, capsys):
    ckpt, planted, marker = _planted(trained, tmp_path, plant.plant_metadata)
    line = _pretrain([*_pretrain_flags(trained), "--save", tmp_path / "new", "--load", tmp_path / "new",
                      "--pretrained-checkpoint", ckpt], capsys)
    assert not marker.exists()
    assert line == f"error: {planted}: refuses to load builtins.exec (a checkpoint's metadata holds only torch's checkpoint records)"


@pytest.mark.parametrize("subcommand, planter", [("mcore-to-hf", plant.plant_metadata),
                                                 ("reshard", plant.plant_common)])
def test_converter_runs_no_code(trained, tmp_path, subcommand, planter, capsys):
    ckpt, planted, marker = _planted(trained, tmp_path, planter)
    extra = ["--tokenizer", "none"] if subcommand == "mcore-to-hf" else ["--tp", 1, "--pp", 1]
    line = _convert([subcommand, "--mcore", ckpt, "--out", tmp_path / "out", *extra], capsys)
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert line.startswith(f"error: {planted}: refuses to load "), line


def test_generate_runs_no_code(trained, tmp_path, capsys):
    from megatron_qwen.inference.chat import main

    ckpt, planted, marker = _planted(trained, tmp_path, plant.plant_metadata)
    line = _exit_line(main, ["--load", ckpt, "--prompt", "hi", "--max-new-tokens", 2], capsys)
    assert not marker.exists()
    assert line.startswith(f"error: {planted}: refuses to load builtins.exec"), line


def test_reward_model_load_runs_no_code(tmp_path):
    """DeepSpeed's engine states (mp_rank_00_model_states.pt) through train_reward_model --load
    (a subprocess: DeepSpeed's state is per process); PPO's engines are built by the same
    init_train_engine."""
    rm_fixtures.make_pairs(tmp_path / "data", n_train=8, n_test=4)
    model = rm_fixtures.make_tiny_qwen2(tmp_path / "model", hidden=16, layers=1)
    flags = ["--model-path", model, "--train-data-path", tmp_path / "data/pairs_train.jsonl",
             "--seq-length", 32, "--global-batch-size", 8, "--micro-batch-size", 8,
             "--epochs", 1, "--zero-stage", 1, "--log-interval", 1]
    proc = _run(REPO / "tools/train_reward_model.py", *flags, "--save", tmp_path / "rm", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # (that unmodified checkpoints still load, ZeRO-3 optimizer states included, is
    # tests/test_rm_train.py::test_resume_continues_the_run)
    marker = tmp_path / "MARKER"
    planted = plant.plant_deepspeed(tmp_path / "rm", marker)
    proc = _run(REPO / "tools/train_reward_model.py", *flags, "--load", tmp_path / "rm",
                "--save", tmp_path / "rm3", cwd=tmp_path)
    line = _error_line(proc)
    assert not marker.exists()
    assert line.startswith(f"error: {planted}: refuses to load "), line


# --------------------------------------------------------------------------- item 10: one line


def _truncate_distcp(ckpt: Path) -> str:
    data = max(plant.iter_dir(ckpt).glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    return f"error: {data}: truncated: "


def _garbage_common(ckpt: Path) -> str:
    path = plant.iter_dir(ckpt) / "common.pt"
    path.write_bytes(b"this is not a torch.save file" * 10)
    return f"error: {path}: not a readable torch.save file"


def _garbage_metadata(ckpt: Path) -> str:
    path = plant.iter_dir(ckpt) / ".metadata"
    path.write_bytes(b"\x80\x04garbage")
    return f"error: {path}: not a checkpoint metadata file"


@pytest.mark.parametrize("breaker", [_truncate_distcp, _garbage_common, _garbage_metadata])
def test_broken_checkpoint_is_one_line(trained, tmp_path, breaker, capsys):
    ckpt = plant.copy_checkpoint(trained / "ckpt", tmp_path / "ckpt")
    want = breaker(ckpt)
    line = _convert(["mcore-to-hf", "--mcore", ckpt, "--out", tmp_path / "out", "--tokenizer", "none"],
                    capsys)
    assert line.startswith(want), line


def test_checkpoint_of_another_shape_is_one_line(trained, tmp_path, capsys):
    line = _pretrain([*_pretrain_flags(trained), "--hidden-size", 32, "--ffn-hidden-size", 64,
                      "--save", "none", "--load", trained / "ckpt"], capsys)
    assert line == (f"error: {plant.iter_dir(trained / 'ckpt')}: tensor embedding.word_embeddings.weight "
                    "has global shape (151936, 64), the model expects (151936, 32); the checkpoint "
                    "holds a model of another shape"), line


def _nan_checkpoint(trained: Path, out: Path, monkeypatch) -> tuple[Path, str]:
    """The trained model resharded by the converter with 3 NaNs planted in layer 1's fc1 weight
    as it passes through (what a run that diverged, or a corrupt copy, leaves behind)."""
    from megatron_qwen.checkpoint import mcore_io

    read = mcore_io.McoreCheckpointReader.load

    def load_with_nan(self, layer=None, roles=None):
        out = read(self, layer, roles)
        if layer == 1:
            out["fc1"] = out["fc1"].clone()
            out["fc1"].view(-1)[:3] = float("nan")
        return out

    with monkeypatch.context() as m:
        m.setattr(mcore_io.McoreCheckpointReader, "load", load_with_nan)
        _convert_ok(["reshard", "--mcore", trained / "ckpt", "--out", out, "--tp", 1, "--pp", 1])
    return mcore_io.resolve_checkpoint_dir(out), "decoder.layers.mlp.linear_fc1.weight (layer 1)"


def _convert_ok(argv) -> None:
    from megatron_qwen.checkpoint.cli import main

    main([str(a) for a in argv])


@pytest.mark.parametrize("subcommand", ["mcore-to-hf", "reshard"])
def test_converter_refuses_nan_weights(trained, tmp_path, subcommand, monkeypatch, capsys):
    ckpt, name = _nan_checkpoint(trained, tmp_path / "nan", monkeypatch)
    extra = ["--tokenizer", "none"] if subcommand == "mcore-to-hf" else ["--tp", 1, "--pp", 1]
    line = _convert([subcommand, "--mcore", tmp_path / "nan", "--out", tmp_path / "out", *extra], capsys)
    assert line.startswith(f"error: {ckpt}: tensor {name} has 3 non-finite value(s) (NaN/Inf) of "), line
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("flag", ["--load", "--pretrained-checkpoint"])
def test_training_refuses_nan_weights(trained, tmp_path, flag, monkeypatch, capsys):
    """Before: the run trained on (loss NaN) and saved; now the load stops with the tensor's name."""
    ckpt, _ = _nan_checkpoint(trained, tmp_path / "nan", monkeypatch)
    where = (["--save", "none", "--load", tmp_path / "nan"] if flag == "--load" else
             ["--save", tmp_path / "new", "--load", tmp_path / "new", flag, tmp_path / "nan"])
    # the reshard padded the 1000-token vocabulary to 1024 rows (the fixture's model has 151,936)
    line = _pretrain([*_pretrain_flags(trained), "--padded-vocab-size", 1024, *where], capsys)
    assert line.startswith(f"error: {ckpt}: tensor model.decoder.layers.1.mlp.linear_fc1.weight has "
                           "3 non-finite value(s) (NaN/Inf) of "), line
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


# --------------------------------------------------------------------------- item 2: paths stay inside


@pytest.mark.parametrize("name", ["../outside/model.safetensors", "/etc/hostname", "a/../../x.safetensors"])
def test_hf_index_cannot_point_outside(tmp_path, name, capsys):
    from tests.test_convert import qwen2_model

    qwen2_model(vocab=64, hidden=16, layers=1, heads=2, kv_heads=2, ffn=32).save_pretrained(tmp_path / "hf")
    (tmp_path / "outside").mkdir()
    shutil.move(tmp_path / "hf/model.safetensors", tmp_path / "outside/model.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "outside/model.safetensors", "pt") as f:
        names = list(f.keys())
    index = tmp_path / "hf/model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {n: name for n in names}}))
    line = _convert(["hf-to-mcore", "--hf", tmp_path / "hf", "--out", tmp_path / "mc"], capsys)
    assert line == f"error: {index}: names {name!r}, which is outside {tmp_path / 'hf'}; refused"
    assert not (tmp_path / "mc").exists()


@pytest.mark.parametrize("tag", ["../elsewhere", "/etc", "..", "."])
def test_ppo_latest_cannot_point_outside(tmp_path, tag):
    from megatron_qwen.checkpoint.mapping import CheckpointError
    from megatron_qwen.rlhf.ppo.checkpoint import latest

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run/latest").write_text(tag + "\n")
    with pytest.raises(CheckpointError, match="outside") as exc:
        latest(str(tmp_path / "run"))
    assert str(exc.value).startswith(f"{tmp_path / 'run/latest'}: names {tag!r}")
    (tmp_path / "run/step_0000001").mkdir()
    (tmp_path / "run/latest").write_text("step_0000001\n")
    assert latest(str(tmp_path / "run")) == tmp_path / "run/step_0000001"


def test_dist_checkpoint_data_file_cannot_point_outside(trained, tmp_path, capsys):
    import pickle

    ckpt = plant.copy_checkpoint(trained / "ckpt", tmp_path / "ckpt")
    meta_path = plant.iter_dir(ckpt) / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = "../../../" + info.relative_path
    meta_path.write_bytes(pickle.dumps(metadata))
    line = _convert(["mcore-to-hf", "--mcore", ckpt, "--out", tmp_path / "out", "--tokenizer", "none"],
                    capsys)
    assert line.startswith(f"error: {meta_path}: names '../../../") and "which is outside" in line


# --------------------------------------------------------------------------- item 7: --load targets


def _not_a_checkpoint(tmp_path: Path):
    cases = {"missing": tmp_path / "missing", "empty": tmp_path / "empty",
             "junk": tmp_path / "junk", "file": tmp_path / "file.txt"}
    cases["empty"].mkdir()
    cases["junk"].mkdir()
    (cases["junk"] / "notes.txt").write_text("x")
    cases["file"].write_text("x")
    return cases


@pytest.mark.parametrize("finetune", [False, True])
def test_load_of_something_not_a_checkpoint_is_an_error(trained, tmp_path, capsys, finetune):
    want = {"missing": "does not exist; only --load equal to --save may start from scratch",
            "empty": "holds no checkpoint (no latest_checkpointed_iteration.txt); only --load "
                     "equal to --save may start from scratch",
            "junk": "holds no checkpoint (no latest_checkpointed_iteration.txt); only --load "
                    "equal to --save may start from scratch",
            "file": "a file, not a checkpoint directory"}
    for case, path in _not_a_checkpoint(tmp_path).items():
        line = _pretrain([*_pretrain_flags(trained), "--save", tmp_path / "save", "--load", path,
                          *(["--finetune"] if finetune else [])], capsys)
        assert line == f"error: --load {path}: {want[case]}", case


def test_load_equal_to_save_may_be_fresh_but_not_junk(trained, tmp_path, capsys):
    from megatron_qwen.train import main

    cases = _not_a_checkpoint(tmp_path)
    line = _pretrain([*_pretrain_flags(trained), "--save", cases["junk"], "--load", cases["junk"]], capsys)
    assert line == (f"error: --load {cases['junk']}: not a checkpoint directory "
                    "(no latest_checkpointed_iteration.txt; it holds notes.txt)")
    line = _pretrain([*_pretrain_flags(trained), "--save", tmp_path / "save", "--load", tmp_path / "save",
                      "--pretrained-checkpoint", cases["missing"]], capsys)
    assert line == f"error: --pretrained-checkpoint {cases['missing']}: no checkpoint there"
    # the requeue pattern: an empty --save (here with a killed first save's debris) starts fresh
    (cases["empty"] / "iter_0000005.tmp").mkdir()
    main([str(a) for a in [*_pretrain_flags(trained), "--save", cases["empty"], "--load", cases["empty"]]])
    assert f"--load {cases['empty']}: no checkpoint there yet; starting from scratch" in capsys.readouterr().out
    assert (cases["empty"] / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


# --------------------------------------------------------------------------- item 9: no orphans


def test_save_helpers_die_with_a_killed_trainer(trained, tmp_path):
    """SIGKILL the trainer while megatron-core's save helpers live (its spawn Manager; on 0.16 a forked
    bucket writer): none outlives it. Each helper is frozen (SIGSTOP) first, once it has lived
    long enough to have asked for its death signal (the Manager 1 s, a writer 0.1 s), so it cannot
    finish on its own: only that signal ends it. The real-vocabulary tiny model makes a save long
    enough for a writer to be caught."""
    import signal
    import time

    import psutil

    from megatron_qwen.runtime import mcore_version

    helpers = {"manager", "writer"} if mcore_version.save_forks_writers() else {"manager"}

    cmd = [sys.executable, str(REPO / "pretrain_qwen.py"), *map(str, _pretrain_flags(trained)),
           "--model.preset", "tiny", "--save", str(tmp_path / "ck"), "--load", str(tmp_path / "ck"),
           "--save-interval", "1", "--train-iters", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=tmp_path, env=ENV)
    first_seen, frozen = {}, {}
    try:
        for line in proc.stdout:
            if "saved checkpoint iteration 1 " in line:
                break
        deadline = time.time() + 180
        while time.time() < deadline and not (helpers <= set(frozen.values())):
            now = time.time()
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    line = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                kind = ("manager" if "spawn_main" in line else
                        "writer" if "pretrain_qwen.py" in line else None)
                if kind is None or child.pid in frozen:
                    continue
                first_seen.setdefault(child.pid, now)
                if now - first_seen[child.pid] >= (1.0 if kind == "manager" else 0.1):
                    try:
                        os.kill(child.pid, signal.SIGSTOP)
                        frozen[child.pid] = kind
                    except ProcessLookupError:
                        pass
        assert helpers <= set(frozen.values()), frozen
        proc.kill()
        proc.wait(timeout=60)

        def alive(pid):
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        deadline = time.time() + 5
        while time.time() < deadline and any(map(alive, frozen)):
            time.sleep(0.1)
        assert not [pid for pid in frozen if alive(pid)], frozen
    finally:
        proc.kill()
        for pid in first_seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
