"""Run a function over JSONL corpora: in this process, on local worker processes, or on Ray.

Every corpus tool (extract, filter, decontaminate, dedup, preprocess) is the same job: read JSONL
files in order, do something per document, write results in the same order. This module is that
job, so all tools share the flags ``--input --workers --ray --strict --max-doc-bytes
--chunk-bytes --summary --no-progress`` (the ``job`` config group), the progress bar, the summary,
the checks of output paths (``check_job_paths``) and the one-commit output (``atomic_paths``).

The API, small on purpose:

``map_chunks(fn, job, read, summary)``
    Yields ``fn(docs)`` for each chunk of input, **in input order**, whatever ``job.workers`` or
    ``job.ray``. ``fn`` takes a list of :class:`~.jsonl.Doc` and returns anything picklable; it
    must be a picklable object (a module-level function or an instance of a module-level class:
    it is sent once to each worker). Parsing happens in the workers, so the driver only cuts
    bytes. Line skips are merged into ``summary.skips``; call ``summary.tick(...)`` to add your
    own counters (e.g. tokens) to the progress bar.

``filter_job(decide, job, read, summary, output, rejected=None)``
    For tools that keep, rewrite or drop records: ``decide(doc)`` returns the record to write
    (the same dict or a new one) or a :class:`Remove` with the reason. Kept records go to
    ``output``, removed ones (with ``"_rejected": {reason, detail, source}``) to ``rejected``;
    removals are counted per reason in ``summary.removed``. Both files appear in one commit.

``atomic_paths(*paths)``
    Context manager yielding temporary paths beside ``paths``; all renamed over them as one
    commit if the block succeeds (a failed rename rolls back the ones done), removed otherwise
    (a failed or interrupted run never leaves half a file, nor a new file beside an old one).

``check_job_paths(job, outputs, inputs)``
    For a tool's top-level ``validate()``: outputs that are directories, under a file, in a
    directory that takes no new files, or the same file as an input or another output are a
    one-line ``ConfigError`` before any work.

``parse_args(ConfigCls, argv)`` / ``run_cli(main)``
    The config loader with list flags (``--input a b``, ``--benchmark x --benchmark y``), and the
    wrapper that turns a :class:`~.jsonl.CorpusError` (and an OSError, MemoryError or
    ImportError: the environment, not a document) into one line on stderr and exit status 1.

Ray: ``--ray local`` starts a local runtime with ``--workers`` CPUs (no dashboard) and stops it at
the end; ``--ray auto`` or ``--ray HOST:PORT`` joins an existing cluster, whose workers must have
this package installed. Chunks travel through the object store, so workers need no shared disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import typing
from collections import Counter, deque
from typing import Any, Callable, Iterator, Optional, Sequence

from megatron_qwen.config import ConfigError, load_config
from megatron_qwen.data.corpus.jsonl import (
    Chunk, CorpusError, Doc, ReadOptions, SkipLog, dump_line, iter_chunks, parse_chunk,
)


@dataclasses.dataclass
class JobConfig:
    """Inputs and execution, shared by every corpus tool."""

    input: list = dataclasses.field(default_factory=list)  # JSONL files (.jsonl or .jsonl.gz), in order
    workers: int = 1  # local processes (or CPUs of the local Ray runtime with --ray local)
    ray: Optional[str] = None  # local | auto | HOST:PORT: run the chunks as Ray tasks
    strict: bool = False  # a skipped line is an error instead of a counted skip
    max_doc_bytes: int = 8_000_000  # longer lines are skipped and counted (0: no limit)
    chunk_bytes: int = 1 << 20  # input bytes per task
    summary: Optional[str] = None  # also write the summary (with every skip's file:line) as JSON here
    progress: bool = True  # tqdm progress bar on stderr (--no-progress to hide)

    def validate(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if not self.input:
            raise ConfigError("job.input: give at least one JSONL file (--input FILE [FILE ...])")
        for path in self.input:
            if not os.path.isfile(path):
                raise ConfigError(f"job.input: {path}: no such file")
        if self.workers < 1:
            raise ConfigError(f"job.workers={self.workers} must be >= 1")
        if self.chunk_bytes < 1:
            raise ConfigError(f"job.chunk_bytes={self.chunk_bytes} must be >= 1")
        if self.max_doc_bytes < 0:
            raise ConfigError(f"job.max_doc_bytes={self.max_doc_bytes} must be >= 0 (0: no limit)")


@dataclasses.dataclass
class Remove:
    """``decide``'s answer for a record to drop: a short reason (counted) and a detail."""

    reason: str
    detail: str = ""


class Summary:
    """Counts of one run and its progress bar: read, kept, removed per reason, skipped lines."""

    def __init__(self, tool: str, job: Optional[JobConfig] = None):
        self.tool = tool
        self.skips = SkipLog()
        self.docs = 0  # records parsed (after skips)
        self.kept = 0
        self.removed: Counter = Counter()
        self.counters: Counter = Counter()  # tool-specific totals (tokens, ...)
        self.bytes = 0
        self.start = time.perf_counter()
        self._bar = None
        if job is not None and job.progress:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: worker processes are forked
            total = sum(os.path.getsize(p) for p in job.input if not p.endswith(".gz")) or None
            self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=tool, file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5)

    def restart(self) -> None:
        """Start the clocks (ours and the bar's) now: the job begins after the tool's imports."""
        self.start = time.perf_counter()
        if self._bar is not None:
            self._bar.reset(total=self._bar.total)

    def tick(self, docs: int = 0, nbytes: int = 0, **counters: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        self.counters.update(counters)
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(self._rates(), refresh=False)

    def _rates(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        parts = [f"{self.docs / dt:,.0f} docs/s", f"{self.bytes / dt / 1e6:,.2f} MB/s"]
        parts += [f"{v / dt:,.0f} {k}/s" for k, v in sorted(self.counters.items())]
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def as_dict(self) -> dict:
        return {
            "tool": self.tool, "records": self.docs, "kept": self.kept, "removed": dict(self.removed),
            "skipped": dict(self.skips.counts), "skipped_at": self.skips.places,
            "bytes": self.bytes, "seconds": round(self.seconds, 3), **dict(self.counters),
        }

    def report(self, places: int = 10) -> str:
        dt = self.seconds
        lines = [f"{self.tool}: {self.docs + self.skips.total:,} lines in {dt:.1f} s ({self._rates()})",
                 f"  records  {self.docs:>12,}"]
        if self.kept or self.removed:
            lines.append(f"  kept     {self.kept:>12,}")
            removed = ", ".join(f"{k} {v:,}" for k, v in sorted(self.removed.items()))
            lines.append(f"  removed  {sum(self.removed.values()):>12,}" + (f"  ({removed})" if removed else ""))
        for key, value in sorted(self.counters.items()):
            lines.append(f"  {key:8s} {value:>12,}")
        skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(self.skips.counts.items()))
        lines.append(f"  skipped  {self.skips.total:>12,}" + (f"  ({skipped})" if skipped else ""))
        for reason in sorted(self.skips.places):
            shown = self.skips.places[reason][:places]
            lines += [f"    {p}" for p in shown]
            if self.skips.counts[reason] > len(shown):
                lines.append(f"    ... {self.skips.counts[reason] - len(shown):,} more {reason}")
        return "\n".join(lines)

    def finish(self, job: Optional[JobConfig] = None) -> None:
        """Close the bar, print the report to stderr, write the JSON summary if asked."""
        self.close()
        print(self.report(), file=sys.stderr)
        if job is not None and job.summary:
            with atomic_paths(job.summary) as (tmp,):
                with open(tmp, "w") as f:
                    json.dump(self.as_dict(), f, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------- execution

def _work(fn: Callable, read: ReadOptions, chunk: Chunk):
    skips = SkipLog()
    docs = parse_chunk(chunk, read, skips)
    return fn(docs), skips, len(docs), len(chunk.data)


_INSTALLED: tuple = ()


def _install(fn: Callable, read: ReadOptions) -> None:
    global _INSTALLED
    _INSTALLED = (fn, read)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool stops its workers with SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # forked while the driver blocked them


def _work_installed(chunk: Chunk):
    return _work(*_INSTALLED, chunk)


def _pool_map(fn, read, chunks, workers: int) -> Iterator:
    # fork: cheap start, and ``fn`` may live anywhere (even in a script's __main__); the driver
    # keeps no threads of its own (tqdm's monitor thread is off) so forking is safe
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    gc.freeze()  # the workers' garbage collector then never writes to (and copies) shared pages
    # a SIGTERM/Ctrl-C while the pool forks its workers would leave the ones already forked
    # orphaned (no pool object yet to terminate them): hold the signals until it exists
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        with ctx.Pool(workers, initializer=_install, initargs=(fn, read)) as pool:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            window: deque = deque()
            for chunk in chunks:
                window.append(pool.apply_async(_work_installed, (chunk,)))
                if len(window) > 2 * workers:
                    yield window.popleft().get()
            while window:
                yield window.popleft().get()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        gc.unfreeze()


def _ray_map(fn, read, chunks, job: JobConfig) -> Iterator:
    import ray

    started = not ray.is_initialized()
    if started:
        if job.ray == "local":
            ray.init(num_cpus=job.workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=job.ray, log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1)(_work)
        fn_ref, read_ref = ray.put(fn), ray.put(read)
        limit = 2 * max(1, int(ray.cluster_resources().get("CPU", job.workers))) + 1
        window: deque = deque()

        def get(ref):
            try:
                return ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, CorpusError):
                    raise CorpusError(str(exc.cause.args[0])) from None
                raise

        for chunk in chunks:
            window.append(task.remote(fn_ref, read_ref, chunk))
            if len(window) >= limit:
                yield get(window.popleft())
        while window:
            yield get(window.popleft())
    finally:
        if started:
            ray.shutdown()


def map_chunks(fn: Callable[[list], Any], job: JobConfig, read: ReadOptions, summary: Summary) -> Iterator:
    """``fn(docs)`` for every chunk of ``job.input``, in input order (see the module docstring)."""
    read = dataclasses.replace(read, max_doc_bytes=job.max_doc_bytes, strict=job.strict)
    chunks = iter_chunks(job.input, job.chunk_bytes, job.max_doc_bytes, summary.skips, job.strict)
    summary.restart()  # rates measure the job, not the tool's imports
    if job.ray:
        results = _ray_map(fn, read, chunks, job)
    elif job.workers > 1:
        results = _pool_map(fn, read, chunks, job.workers)
    else:
        results = (_work(fn, read, chunk) for chunk in chunks)
    for result, skips, ndocs, nbytes in results:
        summary.skips.merge(skips)
        summary.tick(ndocs, nbytes)
        yield result


@contextlib.contextmanager
def atomic_paths(*paths: str):
    """Temporary paths beside ``paths``, all renamed over them together when the block succeeds.

    The outputs of one tool are one commit (``_commit``): if the block or any rename fails, every
    target is left as it was and no temporary or backup file stays behind.
    """
    pid = os.getpid()
    tmps = tuple(f"{path}.tmp-{pid}" for path in paths)
    try:
        for path in paths:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        yield tmps
        _commit(tmps, paths)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def _commit(tmps: Sequence[str], paths: Sequence[str]) -> None:
    """Rename ``tmps`` over ``paths``, all or none.

    Each existing target is first hard-linked to ``PATH.old-PID`` (or, on a file system without
    hard links, renamed there); then the renames run in order. If one fails, the targets already
    replaced get their old file back (or are removed if they did not exist) and the error names
    the path. SIGINT/SIGTERM wait until the commit is over. Only a SIGKILL or a power cut in the
    middle of these renames can leave a mix, with every previous file still there as ``.old-PID``.
    """
    olds = [f"{path}.old-{os.getpid()}" for path in paths]
    backup: list = [None] * len(paths)  # None (no old file) | "link" | "moved"
    done = 0
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for i, (path, old) in enumerate(zip(paths, olds)):
            if not os.path.lexists(path):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)  # left by an earlier run that was killed with this pid
            try:
                os.link(path, old, follow_symlinks=False)
                backup[i] = "link"
            except OSError:
                if os.path.isdir(path) and not os.path.islink(path):
                    raise CorpusError(f"{path}: is a directory, cannot write an output there") from None
                os.rename(path, old)
                backup[i] = "moved"
        for tmp, path in zip(tmps, paths):
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise CorpusError(f"{path}: cannot write ({exc.strerror}); no output was changed") from None
            done += 1
    except BaseException:
        for i, (path, old) in enumerate(zip(paths, olds)):
            with contextlib.suppress(OSError):
                if i < done:
                    os.replace(old, path) if backup[i] else os.unlink(path)
                elif backup[i] == "moved":
                    os.replace(old, path)
                elif backup[i] == "link":
                    os.unlink(old)
        raise
    else:
        for i, old in enumerate(olds):
            if backup[i]:
                with contextlib.suppress(OSError):
                    os.unlink(old)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def check_paths(outputs: dict, inputs: dict) -> None:
    """One-line ConfigErrors, before any work, for outputs that cannot be written or that alias.

    ``outputs`` and ``inputs`` map a setting's name (``filter.output``) to a path (None: unset).
    An output must not be a directory, must have a directory (or a creatable one) as parent we
    can create files in, and must not be the same file as another output or any input (same
    resolved path, through symlinks or hard links).
    """
    outputs = {k: v for k, v in outputs.items() if v}
    for name, path in outputs.items():
        if os.path.isdir(path):
            raise ConfigError(f"{name}: {path} is a directory")
        parent = os.path.dirname(os.path.abspath(path))
        ancestor = parent
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise ConfigError(f"{name}: {path}: {ancestor} is not a directory")
        if ancestor == parent:
            try:
                fd, probe = tempfile.mkstemp(prefix=os.path.basename(path) + ".probe-", dir=parent)
            except OSError as exc:
                raise ConfigError(f"{name}: {path}: cannot create files in {parent} ({exc.strerror})") from None
            os.close(fd)
            os.unlink(probe)
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"{name}: {path}: cannot create directories in {ancestor}")
    seen = [(k, v) for k, v in inputs.items() if v]
    for name, path in outputs.items():
        for other_name, other in seen:
            if same_file(path, other):
                raise ConfigError(f"{name}: {path} is the same file as {other_name} ({other})")
        seen.append((name, path))


def check_job_paths(job: "JobConfig", outputs: dict, inputs: Optional[dict] = None) -> None:
    """``check_paths`` for a tool: its ``outputs``, ``--summary``, ``--input`` and other ``inputs``."""
    names = {f"job.input[{i}]": path for i, path in enumerate(job.input)}
    check_paths({**outputs, "job.summary": job.summary}, {**names, **(inputs or {})})


def same_file(a: str, b: str) -> bool:
    """The same file: one resolved path, or (both existing) one inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


class _Decide:
    """Worker side of ``filter_job``: decide each record, serialise kept and removed lines."""

    def __init__(self, decide: Callable, with_rejected: bool):
        self.decide = decide
        self.with_rejected = with_rejected

    def __call__(self, docs: list):
        kept, rejected, reasons = [], [], Counter()
        for doc in docs:
            out = self.decide(doc)
            if isinstance(out, Remove):
                reasons[out.reason] += 1
                if self.with_rejected:
                    rec = dict(doc.record)
                    rec["_rejected"] = {"reason": out.reason, "detail": out.detail, "source": doc.where}
                    rejected.append(dump_line(rec))
            else:
                kept.append(dump_line(out))
        return b"".join(kept), len(kept), b"".join(rejected), reasons


def filter_job(decide: Callable[[Doc], Any], job: JobConfig, read: ReadOptions, summary: Summary,
               output: str, rejected: Optional[str] = None) -> Summary:
    """Write the records ``decide`` keeps to ``output`` (and the removed ones to ``rejected``)."""
    with atomic_paths(*((output,) + ((rejected,) if rejected else ()))) as tmps:
        write_filtered(decide, job, read, summary, *tmps)
    return summary


def write_filtered(decide: Callable[[Doc], Any], job: JobConfig, read: ReadOptions, summary: Summary,
                   output: str, rejected: Optional[str] = None) -> None:
    """``filter_job`` into files the caller commits (e.g. with more outputs in one ``atomic_paths``)."""
    with open(output, "wb") as out, (open(rejected, "wb") if rejected else contextlib.nullcontext()) as rej:
        for kept, n_kept, removed, reasons in map_chunks(_Decide(decide, bool(rejected)), job, read, summary):
            out.write(kept)
            if rejected:
                rej.write(removed)
            summary.kept += n_kept
            summary.removed.update(reasons)


# --------------------------------------------------------------------------- command line

def _list_flags(cls: type) -> set:
    flags = set()
    hints = typing.get_type_hints(cls)
    for group in dataclasses.fields(cls):
        gcls = hints[group.name]
        for f, hint in typing.get_type_hints(gcls).items():
            if hint is list or typing.get_origin(hint) is list or list in typing.get_args(hint):
                flags |= {f"--{f.replace('_', '-')}", f"--{group.name}.{f}",
                          f"--{group.name}.{f.replace('_', '-')}"}
    return flags


def split_commas(values) -> list:
    """``"en,zh"``, ``["en,zh"]`` or ``["en", "zh"]`` -> ``["en", "zh"]`` (list flags accept both)."""
    values = [values] if isinstance(values, str) else list(values or [])
    return [part.strip() for v in values for part in str(v).split(",") if part.strip()]


def parse_args(cls: type, argv: Optional[Sequence[str]] = None, description: str = "") -> Any:
    """``load_config`` where list fields take several values and may repeat.

    ``--input a.jsonl b.jsonl --benchmark x=1.jsonl --benchmark y=2.jsonl`` becomes one YAML
    list per field before the shared loader sees it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    lists = _list_flags(cls)
    gathered: dict = {}
    rest = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        name, eq, inline = flag.partition("=")
        if eq and name in lists:
            gathered.setdefault(name, []).append(inline)
            i += 1
        elif flag in lists:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            gathered.setdefault(flag, []).extend(argv[i + 1 : j])
            i = j
        else:
            rest.append(flag)
            i += 1
    rest += [f"{flag}={json.dumps(values)}" for flag, values in gathered.items()]
    return load_config(cls, rest, description)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def run_cli(main: Callable[[], Any]) -> None:
    """Run a tool's ``main``; a CorpusError becomes ``error: ...`` and exit status 1.

    So do the errors of the environment rather than of one document (OSError: a disk, a
    permission, an input that cannot be read; MemoryError; ImportError): one line, no traceback,
    no output changed. SIGTERM unwinds like Ctrl-C, so temporary outputs are removed and old outputs stay intact.
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as exc:  # the environment, not a document: a disk, a permission, a device
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    except MemoryError:
        print("error: out of memory (lower --workers or --chunk-bytes)", file=sys.stderr)
        raise SystemExit(1) from None
    except ImportError as exc:
        print(f"error: a required package is missing or broken: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def describe_os_error(exc: OSError) -> str:
    """``PATH: reason`` (both paths for a rename), on one line."""
    where = ": ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}" if where else reason
