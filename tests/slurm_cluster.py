"""A real one-node Slurm (slurmctld + slurmd from the OS packages) for the tests.

Everything lives in one temporary directory: the config, state, spool, logs. The daemons listen
on free ports of their own, run in the foreground under this process, and are stopped by pid.
Clients find the cluster through ``SLURM_CONF`` (in ``SlurmCluster.env``), which every job
inherits too, so a process belongs to this cluster exactly when its environment names that file.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.dist import free_port

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _node_line() -> tuple[str, str]:
    """This machine's node definition as ``slurmd -C`` reports it (name, line)."""
    out = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("NodeName="))
    return line.split()[0].split("=", 1)[1], line


class SlurmCluster:
    """slurmctld and slurmd for one node, configured for a container: no cgroups, no munge."""

    def __init__(self, root: Path, cred_expire_s: int = 5):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.node, node_line = _node_line()
        self.daemons: dict[str, subprocess.Popen] = {}
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "plugstack.conf").write_text("")  # none of the host's SPANK plugins
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=mqtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/none", "CredType=cred/none",
            # a requeued job may start again only once its old credential expired (default 120 s)
            f"AuthInfo=cred_expire={cred_expire_s}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd.log",
            f"PlugStackConfig={r}/plugstack.conf",
            # proctrack/cgroup without a cgroup.conf fails silently: jobs "complete" without running
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            # start jobs at once, and a requeued one as soon as its credential expired (not at the next
            # 30 s backfill or 60 s main scheduling pass)
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",
            "MpiDefault=none", "ReturnToService=2", "JobRequeue=1",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            "",
        ]))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(self.conf)

    # --- lifetime --------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        for name, cmd in (("slurmctld", [_binary("slurmctld"), "-D", "-c", "-f", str(self.conf)]),
                          ("slurmd", [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])):
            log = open(self.root / f"{name}.stdout", "w")
            self.daemons[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                  cwd=self.root, start_new_session=True)
            if name == "slurmctld":
                self._wait(lambda: self.scontrol("ping", check=False).find("UP") >= 0, timeout, "slurmctld up")
        self._wait(lambda: re.search(r"State=IDLE", self.scontrol("show", "node", self.node, check=False)),
                   timeout, "the node idle")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons and anything of this cluster still alive."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            subprocess.run([_binary("scancel"), "--full", "-u", "root"], env=self.env, capture_output=True)
            try:
                self._wait(lambda: not self.cluster_processes(), 30, "the jobs' processes to end")
            except AssertionError:
                pass
        for proc in reversed(list(self.daemons.values())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for pid in self.cluster_processes(include_daemons=True):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --- clients ---------------------------------------------------------------------------
    def scontrol(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run([_binary("scontrol"), *args], env=self.env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"scontrol {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout + proc.stderr

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> int:
        proc = subprocess.run([_binary("sbatch"), "--parsable", *map(str, args)], cwd=cwd,
                              env={**self.env, **(env or {})}, capture_output=True, text=True)
        assert proc.returncode == 0, f"sbatch {' '.join(map(str, args))}: {proc.stderr}"
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, ExitCode, Restarts, StdOut, ...)."""
        out = self.scontrol("show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                             "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"),
                 timeout: float = 300, until=None) -> dict[str, str]:
        """Poll until the job is in one of ``states`` (and ``until(job)`` holds, if given)."""
        last: dict = {}

        def done():
            nonlocal last
            last = self.job(job_id)
            return last.get("JobState") in states and (until is None or until(last))

        self._wait(done, timeout, f"job {job_id} in {states}", lambda: last)
        return last

    def cluster_processes(self, include_daemons: bool = False, job_id: int | None = None) -> list[int]:
        """Pids of live processes whose environment names this cluster's config: the jobs'
        shells, slurmstepd, srun, torchrun, workers (and the daemons themselves if asked);
        with ``job_id``, only the processes of that job (its slurmstepd included)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        job_marker = f"SLURM_JOB_ID={job_id}".encode()
        daemons = {p.pid for p in self.daemons.values()}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                environ = (entry / "environ").read_bytes().split(b"\0")
                if state == "Z" or marker not in environ:
                    continue
                # slurmstepd has the cluster's environment but not the job's: it names the job instead
                if job_id is not None and job_marker not in environ and \
                        not (entry / "cmdline").read_bytes().startswith(f"slurmstepd: [{job_id}.".encode()):
                    continue
            except OSError:
                continue
            # slurmctld's own helper (slurmscriptd) is a child of it; a job's processes never are
            if include_daemons or not (int(entry.name) in daemons or int(ppid) in daemons):
                found.append(int(entry.name))
        return found

    def log(self, name: str = "slurmd") -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def _wait(cond, timeout: float, what: str, detail=lambda: "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} {detail()}")
