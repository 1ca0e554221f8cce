"""A torchrun worker that stands in for the trainer's stop path in the Slurm tests: it waits for
SIGTERM, then takes a few seconds to "save" (writes ``<dir>/saved-<rank>``) and exits 0."""

import os
import signal
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
rank = os.environ["RANK"]
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(time.time()))
(out / f"ready-{rank}").write_text(str(os.getpid()))
print(f"rank {rank} ready", flush=True)
deadline = time.time() + 300
while not stop and time.time() < deadline:
    time.sleep(0.1)
time.sleep(3)  # a save that outlasts srun's reaction to a TERM of its own
(out / f"saved-{rank}").write_text("ok")
print(f"rank {rank} saved", flush=True)
