"""Run ``tools/dedup.py`` (its config, in this process) and print the peak RSS of every stage's
worker processes and of the driver, as one JSON object of kB:

    python dedup_task_peaks.py WINDOW_BYTES DEDUP_ARGS...

Each chunk task and partition task appends its process's ``VmHWM`` (from /proc: the exact peak
of that process, not a sample) to a log when it ends; the stage's figure is the largest. Workers
are forked from the driver, so a worker's peak counts the pages it shares with the driver.
"""

import functools
import json
import os
import sys
import tempfile

from megatron_qwen.data.corpus import dedup, partitioned, runner

LOG = tempfile.mktemp(prefix="task-peaks-")
TASKS = ("minhash_bucket_task", "exact_bucket_task", "label_task", "roots_task", "sizes_task", "order_task",
         "candidates_task", "wanted_task", "verify_task")


def hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def logged(stage: str, fn):
    @functools.wraps(fn)
    def run(*args):
        result = fn(*args)
        with open(LOG, "a") as f:
            f.write(f"{stage} {os.getpid()} {hwm_kb()}\n")
        return result
    return run


partitioned.WINDOW_BYTES = int(sys.argv[1])
for name in TASKS:
    setattr(partitioned, name, logged(name, getattr(partitioned, name)))
runner._work = logged("sign_and_write", runner._work)  # the chunk tasks of every pass
dedup.run(runner.parse_args(dedup.DedupToolConfig, sys.argv[2:]))
peaks = {}
with open(LOG) as f:
    for line in f:
        stage, pid, kb = line.split()
        if int(pid) != os.getpid():
            peaks[stage] = max(peaks.get(stage, 0), int(kb))
os.unlink(LOG)
sys.stdout.write(json.dumps({"driver": hwm_kb(), **peaks}))
