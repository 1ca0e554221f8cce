"""Every corpus tool on a real Ray cluster: a head node started with ``ray start --head`` on
127.0.0.1 (its own ports and temp dir, 2 CPUs), joined through ``--ray HOST:PORT`` and through
``--ray auto`` (RAY_ADDRESS). Outputs must be byte-identical to local runs, also when a Ray
worker is killed in the middle of a job (the task is retried: nothing lost, nothing doubled).
The cluster's processes are found by their session id and stopped by pid (``ray stop`` would
stop every Ray on the machine)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
DATA = REPO / "tests" / "data"
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list:
    """Live (not zombie) processes of session ``sid``: the head's daemons and Ray workers."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def cluster():
    """(address, env for clients, session id) of a head node of our own; stopped by pid at the end."""
    if not RAY.exists():
        pytest.skip("ray is not installed")
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    ports = {flag: _free_port() for flag in ("--object-manager-port", "--node-manager-port",
                                             "--ray-client-server-port", "--dashboard-agent-listen-port",
                                             "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                                             "--metrics-export-port")}
    # the workers import this checkout; token auth off on both sides (ray start turns it on when
    # a token file exists, a client joining by address does not send it)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
           "--temp-dir", temp, "--include-dashboard", "false", "--disable-usage-stats",
           "--object-store-memory", str(200 << 20), *[str(x) for kv in ports.items() for x in kv]]
    head = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sid = head.pid  # the session leader: every daemon and worker of this head stays in its session
    try:
        out, _ = head.communicate(timeout=180)
        if head.returncode:
            pytest.fail(f"ray start failed:\n{out[-3000:]}")
        yield f"127.0.0.1:{port}", {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, sid
    finally:
        for _ in range(50):  # until none is left (a worker may start while others stop)
            live = _session_pids(sid)
            if not live:
                break
            for pid in live:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        assert not _session_pids(sid)
        shutil.rmtree(temp, ignore_errors=True)


def _inputs(tmp: Path) -> dict:
    text = (DATA / "multilingual.jsonl").read_text()
    lines = text.splitlines(keepends=True)
    corpus = tmp / "corpus.jsonl"
    corpus.write_text(text * 3 + "".join(l.upper() for l in lines[:5]))  # exact and near copies
    pages = tmp / "pages.jsonl"
    html = [(DATA / n).read_text() for n in ("page_en.html", "page_zh.html")]
    pages.write_text("".join(json.dumps({"id": i, "html": html[i % 2]}) + "\n" for i in range(8)))
    bench = tmp / "bench.jsonl"
    bench.write_text("".join(lines[i] for i in (0, 7, 15)))
    return {"corpus": corpus, "pages": pages, "bench": bench}


def _cases(inputs: dict, out: Path) -> list:
    """(tool, argv, output files) of every tool, small chunks so each run has several tasks."""
    c, chunk = inputs["corpus"], ["--chunk-bytes", "6000", "--no-progress"]
    cases = [
        ("extract_text", ["--input", inputs["pages"], "--output", out / "extract.jsonl", "--rejected",
                          out / "extract.rej", "--chunk-bytes", "5000", "--no-progress"], ["extract.jsonl", "extract.rej"]),
        ("filter", ["--input", c, "--output", out / "filter.jsonl", "--rejected", out / "filter.rej", *chunk],
         ["filter.jsonl", "filter.rej"]),
        ("decontaminate", ["--input", c, "--output", out / "decon.jsonl", "--rejected", out / "decon.rej",
                           "--benchmark", f"b={inputs['bench']}", *chunk], ["decon.jsonl", "decon.rej"]),
        ("preprocess_data", ["--input", c, "--output-prefix", out / "pp", "--append-eod", *chunk],
         ["pp_text_document.bin", "pp_text_document.idx"]),
    ]
    for name, flags in (("exact", ["--method", "exact"]), ("minhash", ["--method", "minhash"]),
                        ("exactp", ["--method", "exact", "--partitions", "2"]),
                        ("minhashp", ["--method", "minhash", "--partitions", "3", "--verify"])):
        cases.append(("dedup", ["--input", c, "--output", out / f"{name}.jsonl", "--removed", out / f"{name}.rm",
                                *flags, *chunk], [f"{name}.jsonl", f"{name}.jsonl.duplicates.jsonl", f"{name}.rm"]))
    return cases


def _run_cases(cases: list, tmp: Path, env: dict) -> None:
    spec = tmp / f"cases-{len(list(tmp.glob('cases-*')))}.json"
    spec.write_text(json.dumps([[str(TOOLS / f"{tool}.py"), [str(a) for a in argv]] for tool, argv in cases]))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "corpus_cli_cases.py"), str(spec)],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (tool, argv), result in zip(cases, json.loads(proc.stdout)):
        assert result["rc"] == 0, (tool, argv, result["output"][-3000:])


def test_every_tool_on_a_ray_cluster_writes_the_local_bytes(cluster, tmp_path):
    """extract, filter, decontaminate, preprocess and dedup (exact and MinHash, in memory and
    --partitions) through --ray HOST:PORT and through --ray auto: the local run's bytes."""
    address, env, _ = cluster
    inputs = _inputs(tmp_path)
    runs = {"local": [], "address": ["--ray", address], "auto": ["--ray", "auto"]}
    outs = {name: tmp_path / name for name in runs}
    cases = {name: _cases(inputs, out) for name, out in outs.items()}
    for out in outs.values():
        out.mkdir()
    _run_cases([(tool, argv) for tool, argv, _ in cases["local"]], tmp_path, env)
    # both cluster runs in one interpreter: one start and one import of the tools for the two
    _run_cases([(tool, argv + runs[name]) for name in ("address", "auto") for tool, argv, _ in cases[name]],
               tmp_path, env)
    files = {name: {f: (out / f).read_bytes() for _, _, names in cases[name] for f in names}
             for name, out in outs.items()}
    assert files["address"] == files["local"] and files["auto"] == files["local"]
    assert {tool for tool, _, _ in cases["auto"]} == {"extract_text", "filter", "decontaminate", "preprocess_data",
                                                      "dedup"}
    local = files["local"]
    assert local["extract.jsonl"].count(b"\n") > 0 and local["exact.rm"].count(b"\n") >= 5  # real work was done
    assert local["minhashp.jsonl"] == local["minhash.jsonl"] and local["exactp.jsonl"] == local["exact.jsonl"]


def _kill_a_worker_running(sid: int, tasks: tuple, proc) -> int:
    """SIGKILL the first Ray worker of session ``sid`` seen running one of ``tasks`` (its process
    title is ``ray::TASK`` while it runs one) before ``proc`` ends -> its pid, or None."""
    workers: list = []
    deadline = time.time() + 120
    for sweep in itertools.count():
        if proc.poll() is not None or time.time() > deadline:
            return None
        if sweep % 50 == 0:  # new workers start now and then; reading only theirs keeps the poll fast
            workers = [pid for pid in _session_pids(sid) if _cmdline(pid).startswith("ray::")]
        for pid in workers:
            if _cmdline(pid).split(" ")[0] in tasks:
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.002)


def _filter_argv(src: Path, out: Path, name: str) -> list:
    return [str(TOOLS / "filter.py"), "--input", str(src), "--chunk-bytes", "3000", "--no-progress",
            "--output", str(out / f"{name}.jsonl"), "--rejected", str(out / f"{name}.rej")]


def _dedup_argv(src: Path, out: Path, name: str) -> list:
    return [str(TOOLS / "dedup.py"), "--input", str(src), "--chunk-bytes", "3000", "--no-progress",
            "--method", "minhash", "--partitions", "8", "--output", str(out / f"{name}.jsonl"),
            "--removed", str(out / f"{name}.rej")]


@pytest.mark.parametrize("tool,tasks", [
    (_filter_argv, ("ray::_work",)),  # a chunk task (the shared runner)
    (_dedup_argv, tuple(f"ray::{t}" for t in ("minhash_bucket_task", "label_task", "roots_task", "sizes_task",
                                               "order_task"))),  # a partition task of dedup --partitions
], ids=["chunk-task", "partition-task"])
def test_a_killed_ray_worker_loses_and_doubles_nothing(cluster, tmp_path, tool, tasks):
    address, env, sid = cluster
    src = tmp_path / "big.jsonl"
    lines = (DATA / "multilingual.jsonl").read_text().splitlines(keepends=True)
    src.write_text("".join(lines) * 40)
    runs = {"local": [], "ray": ["--ray", address]}
    procs = {name: subprocess.Popen([sys.executable, *tool(src, tmp_path, name), *flags], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, flags in runs.items()}
    killed = _kill_a_worker_running(sid, tasks, procs["ray"])
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, (name, err.decode()[-3000:])
    assert killed is not None, f"the job ended before a worker running {tasks} could be killed"
    for suffix in (".jsonl", ".rej"):
        assert (tmp_path / f"ray{suffix}").read_bytes() == (tmp_path / f"local{suffix}").read_bytes()
    assert (tmp_path / "ray.jsonl").read_bytes().count(b"\n") + (tmp_path / "ray.rej").read_bytes().count(b"\n") \
        == 40 * len(lines)
