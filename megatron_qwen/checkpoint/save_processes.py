"""The processes a megatron-core checkpoint save starts die with the process that saves.

megatron-core 0.16.1's torch_dist writer (``strategies/filesystem_async.py``) starts a ``spawn``
multiprocessing Manager on the first save, kept for the life of the process, and forks one writer
process per bucket during each save (0.17+ keep the Manager but write with threads:
``runtime.mcore_version.save_forks_writers``). A trainer killed with SIGKILL (OOM killer, ``scancel -s 9``,
a node agent) leaves them running, adopted by init: each holds a few hundred MB. Here every one
of them asks Linux to SIGKILL it when its parent dies (``prctl(PR_SET_PDEATHSIG)``): the Manager
through its initializer, the forked writers through an ``os.register_at_fork`` hook. Elsewhere
than Linux this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_manager = None  # the Manager whose queue megatron-core uses; kept alive with the process
_forked_by_main_thread = False


def die_with_parent() -> None:
    """In a child: be SIGKILLed when the parent exits (or now, if it already has)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not permitted (some sandboxes): the child behaves as before
    if os.getppid() != parent:
        os._exit(1)  # the parent died before prctl took effect


def _before_fork() -> None:
    global _forked_by_main_thread
    _forked_by_main_thread = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    # the death signal follows the forking *thread*: only a main-thread fork is tied to it
    if _forked_by_main_thread:
        die_with_parent()


def install() -> None:
    """Call once per process, before its first dist-checkpoint save."""
    global _manager
    if _manager is not None or not sys.platform.startswith("linux"):
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent)
        filesystem_async._results_queue = manager.Queue()
        _manager = manager
    else:
        _manager = True  # megatron-core made its queue already: only the forked writers are covered
