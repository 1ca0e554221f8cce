"""The sbatch scripts: valid bash, and a parallel layout that tiles their nodes x GPUs."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_qwen.config import build_config
from megatron_qwen.training.config import PretrainConfig
from tests.dist import free_port
from tests.slurm_cluster import SlurmCluster, missing_binaries

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from train_common import read_metrics, write_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["pretrain_1p8b.sh", "pretrain_7b.sh", "pretrain_14b.sh", "code_pretrain_7b.sh",
           "code_pretrain_14b.sh"]


def settings(script: Path) -> dict:
    """#SBATCH directives and the NAME=${NAME:-default} settings at the top of a script."""
    text = script.read_text()
    out = {m[0]: m[1] for m in re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M)}
    out.update({m[0]: m[1] for m in re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}", text, re.M)})
    return out


@pytest.mark.parametrize("name", SCRIPTS + ["common.sh"])
def test_bash_syntax(name):
    subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], check=True)


@pytest.mark.parametrize("name", SCRIPTS)
def test_layout_fits_the_allocation_and_the_recipe(name):
    s = settings(REPO / "slurm" / name)
    gpus = int(s["nodes"]) * int(s["gpus-per-node"])
    assert s["GPUS_PER_NODE"] == s["gpus-per-node"]
    tp, pp, mbs, gbs = (int(s[k]) for k in ("TP", "PP", "MICRO_BATCH", "GLOBAL_BATCH"))
    assert s["signal"].startswith("B:USR1@") and "requeue" in (REPO / "slurm" / name).read_text()
    recipe = yaml.safe_load((REPO / s["RECIPE"]).read_text())
    cfg = build_config(PretrainConfig, recipe, {"parallel": {"tensor_model_parallel_size": tp,
                                                             "pipeline_model_parallel_size": pp},
                                                "train": {"micro_batch_size": mbs, "global_batch_size": gbs}})
    dp = cfg.check_world(gpus)  # raises with the reason if TP x PP or the batch do not divide
    assert tp <= int(s["gpus-per-node"])  # tensor parallelism stays inside a node (NVLink)
    assert gbs * cfg.model.seq_length == 2048 * 2048 or gbs * cfg.model.seq_length == 512 * 8192  # 4M tokens
    assert cfg.num_microbatches(dp) >= 1
    # the recipe's own layout is what the script launches
    assert recipe["parallel"]["tensor_model_parallel_size"] == tp
    assert recipe["train"]["micro_batch_size"] == mbs and recipe["train"]["global_batch_size"] == gbs


def test_shared_launcher_rejects_a_layout_that_does_not_tile(tmp_path):
    script = (f"source {REPO}/slurm/common.sh; TP=3 PP=1 GLOBAL_BATCH=2048 MICRO_BATCH=1 check_layout 16")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 2 and "TP=3 x PP=1 does not divide the 16 GPUs" in proc.stderr


def _git_files() -> list[str]:
    proc = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout: the fresh-clone tests need one")
    return proc.stdout.split()


def test_every_log_directory_of_the_scripts_exists_in_a_fresh_clone():
    """sbatch opens --output/--error before the script runs (relative to the submit directory):
    a directory that a fresh clone lacks fails the job at launch, with no log anywhere."""
    tracked = _git_files()
    dirs_in_clone = {str(Path(f).parent) for f in tracked} | {"."}
    for script in sorted((REPO / "slurm").glob("*.sh")):
        for opt, path in re.findall(r"^#SBATCH --(output|error)=(\S+)", script.read_text(), re.M):
            parent = str(Path(path).parent)
            assert not Path(path).is_absolute() and parent in dirs_in_clone, \
                f"{script.name}: #SBATCH --{opt}={path}: {parent}/ is not in a fresh clone"


# --- a real Slurm ---------------------------------------------------------------------------------
# The tests below start their own slurmctld + slurmd (tests/slurm_cluster.py) and submit the real
# scripts from a fresh clone: slurm/pretrain_1p8b.sh with the tiny model on CPU (2 gloo workers).

needs_slurm = pytest.mark.skipif(
    bool(missing_binaries()) or os.geteuid() != 0,
    reason=f"no Slurm on this machine (missing {', '.join(missing_binaries())}); apt-get install slurmctld "
           "slurmd slurm-client" if missing_binaries() else "the test Slurm runs its daemons as root (SlurmUser=root)")
TRAIN_ITERS = 1200
# the 8-GPU, --exclusive scripts as 1-CPU jobs on one CPU node, so that two jobs run side by side
SBATCH_CPU = ["--nodes=1", "--cpus-per-task=1", "--gpus-per-node=0", "--oversubscribe"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of the committed HEAD: what a user has before their first sbatch."""
    _git_files()
    path = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(path)], check=True)
    assert sorted(p.name for p in (path / "logs").iterdir()) == [".gitignore"]
    return path


def _job_env(clone: Path, run: str) -> dict:
    return {"PYTHON": sys.executable, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1", "RUN_NAME": run,
            "MASTER_PORT": str(free_port()), "HF_HUB_OFFLINE": "1"}


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def pretrain_jobs(slurm, clone, tmp_path_factory):
    """Two jobs of slurm/pretrain_1p8b.sh: `ref` runs uninterrupted; `job` is requeued by
    `scontrol requeue` (preemption), then gets the time-limit warning (--signal=B:USR1@90 once its
    limit is lowered to the next minute), then finishes."""
    tmp = tmp_path_factory.mktemp("pretrain")
    corpus = str(tmp / "toy")
    write_corpus(corpus, vocab_size=1000, max_docs=40)

    def submit(name, *sbatch_args):
        # the recipe pins the real vocabulary's 151,936 rows (a YAML field outranks a preset):
        # unpinned, tiny_vocab's 1,000 tokens pad to 1,024 rows
        flags = ["--model.preset", "tiny_vocab", "--padded-vocab-size", "none", "--data-path", corpus, "--eod-id", 999, "--split", "1,0,0",
                 "--data-cache-path", tmp / f"cache-{name}", "--train-iters", TRAIN_ITERS, "--log-interval", 1,
                 "--eval-interval", "none", "--save-interval", "none", "--metrics-file", tmp / f"{name}.jsonl"]
        env = {**_job_env(clone, name), "RECIPE": "examples/pretrain_tiny.yaml", "TP": "1", "GPUS_PER_NODE": "2",
               "MICRO_BATCH": "2", "GLOBAL_BATCH": "4"}
        return slurm.sbatch(*SBATCH_CPU, "--time=30", *sbatch_args, "slurm/pretrain_1p8b.sh", *flags,
                            cwd=clone, env=env)

    ref = submit("ref")
    job = submit("job", "--signal=B:USR1@90")
    metrics = tmp / "job.jsonl"
    rows = lambda: read_metrics(metrics) if metrics.exists() else []  # noqa: E731
    leftovers = {}

    def wait_requeued(restarts, after):
        def requeued():
            info = slurm.job(job)
            assert info["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), \
                f"the job ended after {after} instead of being requeued: {info}"
            return info["JobState"] in ("PENDING", "RUNNING") and info["Restarts"] == str(restarts)

        _wait(requeued, 300, f"the job to be requeued after {after}")
        # the old run's processes (slurmstepd's clean-up may take a moment) end while the job is pending
        old = set()
        while slurm.job(job)["JobState"] == "PENDING":
            old = set(slurm.cluster_processes(job_id=job))
            if not old:
                break
            time.sleep(0.2)
        leftovers[restarts] = [_cmdline(pid) for pid in sorted(old) if Path(f"/proc/{pid}").exists()]

    _wait(lambda: len(rows()) >= 5, 600, "the job's first 5 iterations")
    slurm.scontrol("requeue", str(job))                                  # (b) preemption
    wait_requeued(1, "scontrol requeue")
    k1 = rows()[-1]["iteration"]
    _wait(lambda: rows()[-1]["iteration"] >= k1 + 5, 600, "the requeued job to train")
    run_s = sum(int(x) * 60 ** i for i, x in enumerate(reversed(slurm.job(job)["RunTime"].split(":"))))
    slurm.scontrol("update", f"JobId={job}", f"TimeLimit={run_s // 60 + 2}")  # (c) USR1 within 30 s
    wait_requeued(2, "the time-limit warning (train longer if it finished first)")
    slurm.scontrol("update", f"JobId={job}", "TimeLimit=30")              # the rerun may finish
    info = {name: slurm.wait_job(j, timeout=600) for name, j in (("ref", ref), ("job", job))}
    return {"slurm": slurm, "clone": clone, "tmp": tmp, "ids": {"ref": ref, "job": job}, "info": info,
            "leftovers": leftovers}


def _cmdline(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return f"{pid}: (gone)"


def _node_log(runs, name):
    job_id = runs["ids"][name]
    return (runs["clone"] / "logs" / f"{name}-{job_id}" / f"qwen-1p8b-{job_id}-node0.log").read_text()


@needs_slurm
def test_a_job_from_a_fresh_clone_runs_and_writes_its_logs(pretrain_jobs):
    runs, ref = pretrain_jobs, pretrain_jobs["ids"]["ref"]
    info = runs["info"]["ref"]
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), info
    stdout = runs["clone"] / "logs" / f"qwen-1p8b-{ref}.out"
    assert info["StdOut"] == str(stdout)
    assert f"job {ref}: 1 nodes x 2 GPUs, pretrain_qwen.py, recipe examples/pretrain_tiny.yaml" in stdout.read_text()
    log = _node_log(runs, "ref")
    assert f"iteration {TRAIN_ITERS:>7d}/{TRAIN_ITERS} | lm loss" in log
    assert f"saved checkpoint iteration {TRAIN_ITERS}" in log
    assert len(read_metrics(runs["tmp"] / "ref.jsonl")) == TRAIN_ITERS


def _stops(log):
    """The iterations the job saved at on a stop signal, and those it resumed from."""
    return ([int(k) for k in re.findall(r"exiting at iteration (\d+) \(signal received\) after saving", log)],
            [int(k) for k in re.findall(r"resumed from \S+/iter_(\d+): iteration", log)])


@needs_slurm
def test_requeue_and_time_limit_signal_save_and_resume_with_the_same_losses(pretrain_jobs):
    runs = pretrain_jobs
    info, job = runs["info"]["job"], runs["ids"]["job"]
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), info
    saved, resumed = _stops(_node_log(runs, "job"))
    # (b) scontrol requeue and (c) the USR1 time-limit warning each saved where it stopped, and the
    # next run resumed from exactly there: no iteration lost or repeated
    assert len(saved) == 2 and resumed == saved, (saved, resumed)
    rows = read_metrics(runs["tmp"] / "job.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, TRAIN_ITERS + 1))
    ref = {r["iteration"]: r["lm_loss"] for r in read_metrics(runs["tmp"] / "ref.jsonl")}
    diffs = [(r["iteration"], r["lm_loss"], ref[r["iteration"]]) for r in rows if r["lm_loss"] != ref[r["iteration"]]]
    assert not diffs, f"losses differ from the uninterrupted run: {diffs[:5]}"
    stdout = (runs["clone"] / "logs" / f"qwen-1p8b-{job}.out").read_text()
    assert "SIGTERM: asking workers" in stdout and "SIGUSR1: asking workers" in stdout
    assert stdout.count(f"requeued job {job}") == 1  # only the USR1 stop requeues itself


@needs_slurm
def test_nothing_of_a_job_outlives_it(pretrain_jobs):
    runs = pretrain_jobs
    assert runs["leftovers"] == {1: [], 2: []}  # between the runs of the requeued job
    _wait(lambda: not runs["slurm"].cluster_processes(), 30, "no process of any job left")


CANCEL_SCRIPT = """#!/bin/bash
#SBATCH --job-name=save-on-term
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
RECIPE=examples/pretrain_tiny.yaml GPUS_PER_NODE=2
source "$SLURM_SUBMIT_DIR/slurm/common.sh"
prepare_job_dirs
run_on_nodes tests/scripts/save_on_term.py "$OUT"
"""


@needs_slurm
def test_scancel_gives_workers_time_to_save_and_does_not_requeue(slurm, clone, tmp_path):
    """A TERM of its own makes srun SIGKILL its tasks, and a requeue in the TERM trap would bring
    back a job the user cancelled: the launcher must do neither."""
    script = tmp_path / "cancel.sh"
    script.write_text(CANCEL_SCRIPT)
    job = slurm.sbatch(*SBATCH_CPU, script, cwd=clone, env={**_job_env(clone, "cancel"), "OUT": str(tmp_path)})
    _wait(lambda: all((tmp_path / f"ready-{r}").exists() for r in (0, 1)), 300, "both workers")
    subprocess.run(["scancel", str(job)], env=slurm.env, check=True)
    slurm.wait_job(job, states=("CANCELLED",), timeout=60)
    _wait(lambda: not slurm.cluster_processes(job_id=job), 60, "the job's processes to end")
    assert sorted(p.name for p in tmp_path.glob("saved-*")) == ["saved-0", "saved-1"]
    time.sleep(8)  # a requeued job would be pending or running again after cred_expire (5 s)
    info = slurm.job(job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), info
