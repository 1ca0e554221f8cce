"""Dedup in bounded memory: signatures, buckets, pairs and clusters live on disk, in P partitions.

The in-memory path (``dedup.run_exact`` / ``run_minhash``) holds one entry per document in the
driver. This one (``--partitions P``) holds none: what grows with the corpus is written to a work
directory as it is computed and later read back one partition at a time, by partition tasks that
run on local processes or as Ray tasks (the work directory must then be on a file system every
Ray node sees). It removes exactly the records the in-memory path removes and writes the same
bytes (tested), because it computes the same thing:

1. **Sign pass** (the runner's chunk workers): per record its place (file, line, id), and for
   MinHash its signature and one (band, key, position) bucket record per band (exact: its
   128-bit key). The driver gives each chunk its global positions and appends: places to
   ``places.jsonl`` (+ an offset per record), signatures to ``signatures.bin`` (row = position),
   bucket records to partition ``key % P``. Nothing is kept.
2. **Buckets** (one task per partition): sort by (band, key, position); every member of a bucket
   is paired with its first document, and the pair is kept when the two rows really are equal
   (read from the signature file: only the pairs' rows are touched), as ``minhash.band_edges``
   does. Exact: every record of a key after the first is a duplicate of the first.
3. **Connected components** (MinHash): min-label propagation over the candidate graph, one
   wave of P tasks a round. Each node's label starts as itself; a node whose label dropped sends
   it to its neighbours (edges stored both ways, partitioned by ``node % P``); a round ends with
   every partition holding its nodes' minimum label so far, and the loop stops when no label
   changed. The result is each node's component minimum: ``minhash.components``' root.
   Rounds = the largest distance from a node to its component's minimum, plus one.
4. **Duplicates** (root, cluster size, estimated Jaccard) are range-partitioned by position so
   that partition files in order are input order; the **write pass** reads the input again and
   streams it against them.

Memory: the driver holds a window of chunk results and P open files; a task holds one partition
(about N x bands x 20 bytes / P for buckets), the signatures of at most ``PAIRS_PER_READ`` pairs
and a map window of at most ``WINDOW_BYTES`` of a shared file (``rows_at``): never a map of a
whole corpus-sized file, whose touched pages would count in its RSS. Disk: see docs/dedup.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from megatron_qwen.data.corpus import minhash
from megatron_qwen.data.corpus.jsonl import compact_line

BUCKET = np.dtype([("band", "<i4"), ("key", "<u8"), ("pos", "<i8")])
EXACT = np.dtype([("k1", "<u8"), ("k2", "<u8"), ("pos", "<i8")])
EDGE = np.dtype([("a", "<i8"), ("b", "<i8")])  # also (node, label) messages and labels
DUP = np.dtype([("pos", "<i8"), ("root", "<i8"), ("size", "<i8"), ("est", "<f8"), ("jac", "<f8")])
LINE_BITS = 40  # a record's (input index, line) as one int64: index << 40 | line


# --------------------------------------------------------------------------- files


def _save(path: str, array: np.ndarray) -> None:
    """Write-then-rename, so a task that is retried (a worker died) rewrites the same file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _load(path: str, mmap: bool = False) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def write_shuffle(work: str, name: str, source: int, records: np.ndarray, dest: np.ndarray, parts: int) -> None:
    """One task's records for every partition: sorted by destination, with offsets."""
    order = np.argsort(dest, kind="stable")
    offsets = np.searchsorted(dest[order], np.arange(parts + 1))
    _save(os.path.join(work, f"{name}-{source}.off.npy"), offsets.astype(np.int64))
    _save(os.path.join(work, f"{name}-{source}.npy"), records[order])


def read_shuffle(work: str, name: str, dest: int, parts: int, dtype: np.dtype) -> np.ndarray:
    """Every source's records for partition ``dest``."""
    pieces = []
    for source in range(parts):
        offsets = _load(os.path.join(work, f"{name}-{source}.off.npy"))
        data = _load(os.path.join(work, f"{name}-{source}.npy"), mmap=True)
        pieces.append(np.array(data[offsets[dest] : offsets[dest + 1]]))
    return np.concatenate(pieces) if pieces else np.empty(0, dtype)


class Appender:
    """The driver's append-only partition files: records go to file ``part(record)``."""

    def __init__(self, work: str, name: str, parts: int, dtype: np.dtype):
        self.paths = [os.path.join(work, f"{name}-{p}.bin") for p in range(parts)]
        self.files = [open(p, "wb") for p in self.paths]  # default 8 KB buffers: P of them
        self.dtype = dtype

    def add(self, records: np.ndarray, part: np.ndarray) -> None:
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(len(self.files) + 1))
        records = records[order]
        for p, f in enumerate(self.files):
            if bounds[p + 1] > bounds[p]:
                f.write(records[bounds[p] : bounds[p + 1]].tobytes())

    def close(self) -> None:
        for f in self.files:
            f.close()


def read_appended(work: str, name: str, part: int, dtype: np.dtype) -> np.ndarray:
    return np.fromfile(os.path.join(work, f"{name}-{part}.bin"), dtype=dtype)


class PlaceStore:
    """(file, line, id) of every record by position: one JSON line each and its offset."""

    def __init__(self, work: str):
        self.path, self.index = os.path.join(work, "places.jsonl"), os.path.join(work, "places.off")
        self._data = open(self.path, "wb", buffering=1 << 16)
        self._off = open(self.index, "wb", buffering=1 << 16)
        self.size = 0
        self.count = 0

    def add(self, blob: bytes, lengths: np.ndarray) -> None:
        ends = np.cumsum(lengths, dtype=np.int64)
        self._off.write((self.size + ends - lengths).astype("<i8").tobytes())
        self._data.write(blob)
        self.size += len(blob)
        self.count += len(lengths)

    def close(self) -> None:
        self._data.close()
        self._off.close()

    @contextlib.contextmanager
    def reader(self):
        # offsets by pread, not a memory map: the driver's RSS then does not grow by 8 bytes a document
        with open(self.path, "rb") as f, open(self.index, "rb", buffering=0) as index:
            def place(pos: int) -> dict:
                f.seek(int.from_bytes(os.pread(index.fileno(), 8, 8 * pos), "little"))
                file, line, ident = json.loads(f.readline())
                out = {"file": file, "line": line}
                if ident is not None:
                    out["id"] = ident
                return out
            yield place


def places_blob(docs, id_key: str) -> tuple[bytes, np.ndarray]:
    """Worker side of ``PlaceStore.add``: the chunk's place lines and their lengths."""
    lines = [compact_line([d.file, d.line, d.record.get(id_key)]) for d in docs]
    return b"".join(lines), np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))


@contextlib.contextmanager
def work_dir(parent: Optional[str], beside: str):
    """A fresh directory for one run (under ``parent``, else beside the output), always removed."""
    base = parent or os.path.dirname(os.path.abspath(beside))
    os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix="dedup-work-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- partition tasks


def _call(args):
    fn, arg = args
    return fn(*arg)


class Tasks:
    """Runs partition tasks on local processes or Ray tasks; one pool for every stage of a run.

    ``map(fn, args)`` is ``[fn(*a) for a in args]`` (results in order). The local pool is forked
    once, at the first stage with more than one task, and serves every later stage (a pool per
    stage costs a fork and a teardown each: a fixed cost that shows at small corpora). A Ray
    task whose worker dies is retried (files are written then renamed, so a retry rewrites the
    same bytes). Runs in this process when there is one worker and no Ray.
    """

    def __init__(self, workers: int = 1, ray_address: Optional[str] = None):
        self.workers, self.ray_address = workers, ray_address
        self._pool = None

    def __enter__(self) -> "Tasks":
        return self

    def __exit__(self, *exc) -> None:
        self.release(failed=exc[0] is not None)

    def release(self, failed: bool = False) -> None:
        """Stop the pool (the next ``map`` forks a new one): before the driver forks other
        workers, since a pool's threads in a process that forks could hold a lock in the child."""
        if self._pool is not None:
            self._pool.terminate() if failed else self._pool.close()
            self._pool.join()
            self._pool = None

    def map(self, fn: Callable, args: Sequence[tuple]) -> list:
        if self.ray_address:
            import ray

            task = ray.remote(num_cpus=1, max_retries=3)(fn)
            return ray.get([task.remote(*a) for a in args])
        if self.workers > 1 and len(args) > 1:
            if self._pool is None:
                import multiprocessing

                import numpy.ma  # noqa: F401  np.unique imports it on first call: once here, not per worker

                methods = multiprocessing.get_all_start_methods()
                ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
                self._pool = ctx.Pool(self.workers)
            return self._pool.map(_call, [(fn, a) for a in args], chunksize=1)
        return [fn(*a) for a in args]


def _range_part(pos: np.ndarray, n: int, parts: int) -> np.ndarray:
    """Contiguous position ranges: partition files read in order are input order."""
    return (pos.astype(np.int64) * parts // max(n, 1)).astype(np.int64)


def exact_bucket_task(work: str, part: int, parts: int, n: int) -> int:
    """Sort one partition of exact keys: later records of a key duplicate its first. -> distinct keys."""
    rec = read_appended(work, "keys", part, EXACT)
    rec = rec[np.lexsort((rec["pos"], rec["k2"], rec["k1"]))]
    new = np.ones(len(rec), dtype=bool)
    new[1:] = (rec["k1"][1:] != rec["k1"][:-1]) | (rec["k2"][1:] != rec["k2"][:-1])
    first = rec["pos"][np.flatnonzero(new)][np.cumsum(new) - 1]
    dup = np.zeros(int(np.count_nonzero(~new)), dtype=DUP)
    dup["pos"], dup["root"] = rec["pos"][~new], first[~new]
    write_shuffle(work, "dups", part, dup, _range_part(dup["pos"], n, parts), parts)
    return int(np.count_nonzero(new))


WINDOW_BYTES = 16 << 20  # the most of a shared file one task maps at a time
PAIRS_PER_READ = 1 << 13  # candidate pairs whose two signatures a bucket task holds at once


def rows_at(path: str, dtype, width: int, positions: np.ndarray) -> np.ndarray:
    """Rows ``positions`` of a file of ``width``-wide rows, in the order asked.

    Read through one memory map of at most ``WINDOW_BYTES`` at a time, each unmapped before the
    next: the pages of a mapped file count in a process's RSS while mapped, so one map of the
    whole file would grow a task's memory with the corpus (random rows touch every page).
    """
    dtype = np.dtype(dtype)
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty((len(positions), width), dtype=dtype)
    if not len(positions):
        return out
    order = np.argsort(positions, kind="stable")
    wanted = positions[order]
    per_window = max(1, WINDOW_BYTES // (width * dtype.itemsize))
    total = os.path.getsize(path) // (width * dtype.itemsize)
    start = 0
    while start < len(wanted):
        lo = int(wanted[start])
        hi = min(lo + per_window, total)
        stop = int(np.searchsorted(wanted, hi, side="left"))
        window = np.memmap(path, dtype=dtype, mode="r", offset=lo * width * dtype.itemsize, shape=(hi - lo, width))
        out[order[start:stop]] = window[wanted[start:stop] - lo]
        del window
        start = stop
    return out


def _signatures_at(work: str, num_perm: int, dtype: str, positions: np.ndarray) -> np.ndarray:
    return rows_at(os.path.join(work, "signatures.bin"), dtype, num_perm, positions)


def minhash_bucket_task(work: str, part: int, parts: int, n: int, num_perm: int, dtype: str, rows: int) -> int:
    """Candidate pairs of one bucket partition (``band_edges``' rule), stored both ways by node."""
    rec = read_appended(work, "buckets", part, BUCKET)
    rec = rec[np.lexsort((rec["pos"], rec["key"], rec["band"]))]
    new = np.ones(len(rec), dtype=bool)
    new[1:] = (rec["key"][1:] != rec["key"][:-1]) | (rec["band"][1:] != rec["band"][:-1])
    first = rec["pos"][np.flatnonzero(new)][np.cumsum(new) - 1]
    src, dst, band = first[~new], rec["pos"][~new], rec["band"][~new]
    same = np.ones(len(src), dtype=bool)
    for lo in range(0, len(src), PAIRS_PER_READ):  # a block of pairs' signatures at a time
        hi = min(lo + PAIRS_PER_READ, len(src))
        cols = band[lo:hi, None] * rows + np.arange(rows)[None, :]
        a, b = _signatures_at(work, num_perm, dtype, src[lo:hi]), _signatures_at(work, num_perm, dtype, dst[lo:hi])
        same[lo:hi] = np.all(np.take_along_axis(a, cols, 1) == np.take_along_axis(b, cols, 1), axis=1)
    src, dst = src[same], dst[same]
    edges = np.empty(2 * len(src), dtype=EDGE)
    edges["a"], edges["b"] = np.concatenate([src, dst]), np.concatenate([dst, src])
    write_shuffle(work, "edges", part, edges, edges["a"] % parts, parts)
    return len(src)


def _min_per_node(node: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(node, label) records reduced to one per node with its least label."""
    order = np.lexsort((label, node))
    node, label = node[order], label[order]
    first = np.ones(len(node), dtype=bool)
    first[1:] = node[1:] != node[:-1]
    out = np.empty(int(first.sum()), dtype=EDGE)
    out["a"], out["b"] = node[first], label[first]
    return out


def label_task(work: str, part: int, parts: int, round_: int, edges_name: str = "edges") -> int:
    """One round of min-label propagation for the nodes of ``part`` -> messages sent."""
    adj_path, lab_path = os.path.join(work, f"adj-{part}.npy"), os.path.join(work, f"labels-{part}.npy")
    if round_ == 0:
        edges = read_shuffle(work, edges_name, part, parts, EDGE)
        edges = np.unique(edges)  # sorted by (a, b)
        nodes = np.unique(edges["a"])
        labels = nodes.copy()
        changed = np.ones(len(nodes), dtype=bool)
        _save(adj_path, edges)
    else:
        edges = _load(adj_path)
        lab = _load(lab_path)
        nodes, labels = lab["a"], lab["b"].copy()
        msgs = read_shuffle(work, f"msg{round_ - 1}", part, parts, EDGE)
        old = labels.copy()
        np.minimum.at(labels, np.searchsorted(nodes, msgs["a"]), msgs["b"])
        changed = labels < old
    lab = np.empty(len(nodes), dtype=EDGE)
    lab["a"], lab["b"] = nodes, labels
    _save(lab_path, lab)
    at = np.searchsorted(nodes, edges["a"])
    send = changed[at] if len(edges) else np.zeros(0, dtype=bool)
    msgs = _min_per_node(edges["b"][send], labels[at[send]])
    write_shuffle(work, f"msg{round_}", part, msgs, msgs["a"] % parts, parts)
    return len(msgs)


def roots_task(work: str, part: int, parts: int) -> None:
    """Each node's (root, node) to the root's partition, to count cluster sizes there."""
    lab = _load(os.path.join(work, f"labels-{part}.npy"))
    out = np.empty(len(lab), dtype=EDGE)
    out["a"], out["b"] = lab["b"], lab["a"]
    write_shuffle(work, "roots", part, out, out["a"] % parts, parts)


def sizes_task(work: str, part: int, parts: int, n: int, num_perm: int, dtype: str, verified: bool = False) -> int:
    """Cluster sizes, estimated (and with --verify true) Jaccard of each duplicate -> clusters rooted here."""
    members = read_shuffle(work, "roots", part, parts, EDGE)
    roots, inverse, counts = np.unique(members["a"], return_inverse=True, return_counts=True)
    dup_mask = members["b"] != members["a"]
    dup = np.zeros(int(dup_mask.sum()), dtype=DUP)
    dup["pos"], dup["root"] = members["b"][dup_mask], members["a"][dup_mask]
    dup["size"] = counts[inverse[dup_mask]]
    if len(dup):
        dup["est"] = minhash.estimated_jaccard(_signatures_at(work, num_perm, dtype, dup["pos"]),
                                               _signatures_at(work, num_perm, dtype, dup["root"]))
    dup["jac"] = np.nan
    if verified and len(dup):
        with ShingleStore(work) as store:
            dup["jac"] = [minhash.jaccard(store[a], store[b]) for a, b in zip(dup["pos"].tolist(), dup["root"].tolist())]
    write_shuffle(work, "dups", part, dup, _range_part(dup["pos"], n, parts), parts)
    return len(roots)


def order_task(work: str, part: int, parts: int) -> int:
    """The duplicates of one position range, sorted: partition files in order are input order."""
    dup = read_shuffle(work, "dups", part, parts, DUP)
    dup = dup[np.argsort(dup["pos"], kind="stable")]
    _save(os.path.join(work, f"final-{part}.npy"), dup)
    return len(dup)


# --------------------------------------------------------------------------- --verify


def candidates_task(work: str, part: int, parts: int, n: int) -> None:
    """The documents in candidate pairs (edges' first ends), to their position range."""
    nodes = np.unique(read_shuffle(work, "edges", part, parts, EDGE)["a"])
    write_shuffle(work, "wanted", part, nodes, _range_part(nodes, n, parts), parts)


def wanted_task(work: str, part: int, parts: int) -> int:
    nodes = np.unique(read_shuffle(work, "wanted", part, parts, np.dtype("<i8")))
    _save(os.path.join(work, f"wanted-sorted-{part}.npy"), nodes)
    return len(nodes)


def gather_wanted(work: str, parts: int, n: int) -> int:
    """``wanted.bin`` (positions, sorted) and ``wanted_keys.bin`` (their input index << 40 | line)."""
    total = 0
    with open(os.path.join(work, "wanted.bin"), "wb") as pos_f, open(os.path.join(work, "wanted_keys.bin"), "wb") as key_f:
        for part in range(parts):
            nodes = _load(os.path.join(work, f"wanted-sorted-{part}.npy"))
            pos_f.write(nodes.astype("<i8").tobytes())
            key_f.write(rows_at(os.path.join(work, "lines.bin"), "<i8", 1, nodes).tobytes())
            total += len(nodes)
    return total


class ShingleStore:
    """Unique shingle hashes of the wanted documents, by position (``wanted.bin`` order)."""

    def __init__(self, work: str):
        self.work = work

    def __enter__(self):
        w = self.work
        size = os.path.getsize(os.path.join(w, "wanted.bin")) // 8
        self.pos = np.memmap(os.path.join(w, "wanted.bin"), dtype="<i8", mode="r") if size else np.empty(0, np.int64)
        self.off = np.memmap(os.path.join(w, "shingles.off"), dtype="<i8", mode="r") if size else np.zeros(1, np.int64)
        total = int(self.off[-1]) if size else 0
        self.hashes = (np.memmap(os.path.join(w, "shingles.bin"), dtype="<u8", mode="r") if total
                       else np.empty(0, np.uint64))
        return self

    def __exit__(self, *exc):
        return False

    def __getitem__(self, position: int) -> np.ndarray:
        k = int(np.searchsorted(self.pos, position))
        return np.asarray(self.hashes[self.off[k] : self.off[k + 1]])


def verify_task(work: str, part: int, parts: int, threshold: float) -> int:
    """Keep the candidate pairs whose true Jaccard reaches ``threshold`` -> pairs kept."""
    edges = read_shuffle(work, "edges", part, parts, EDGE)
    edges = np.unique(edges[edges["a"] < edges["b"]])
    with ShingleStore(work) as store:
        ok = np.array([minhash.jaccard(store[a], store[b]) >= threshold
                       for a, b in zip(edges["a"].tolist(), edges["b"].tolist())], dtype=bool)
    src, dst = edges["a"][ok], edges["b"][ok]
    both = np.empty(2 * len(src), dtype=EDGE)
    both["a"], both["b"] = np.concatenate([src, dst]), np.concatenate([dst, src])
    write_shuffle(work, "vedges", part, both, both["a"] % parts, parts)
    return int(ok.sum())


def _each(work: str, parts: int, tasks: Tasks, fn: Callable, *args) -> list:
    return tasks.map(fn, [(work, p, parts, *args) for p in range(parts)])


def exact_duplicates(work: str, n: int, parts: int, workers: int = 1, ray_address: Optional[str] = None) -> dict:
    """Stages 2 and 4 for exact keys (``keys-P.bin``) -> facts; then ``iter_duplicates``."""
    with Tasks(workers, ray_address) as tasks:
        distinct = sum(_each(work, parts, tasks, exact_bucket_task, n))
        _remove(work, "keys", parts, (".bin",))
        _each(work, parts, tasks, order_task)
    return {"unique_texts": distinct}


def minhash_duplicates(work: str, n: int, parts: int, num_perm: int, dtype: str, rows: int,
                       workers: int = 1, ray_address: Optional[str] = None,
                       verify: Optional[Callable[[], None]] = None, threshold: float = 0.0) -> dict:
    """Stages 2-4 for MinHash (``buckets-P.bin``, ``signatures.bin``) -> facts; then ``iter_duplicates``.

    With ``verify`` (a callable that fills the shingle store, see ``gather_wanted``), only the
    candidate pairs whose true Jaccard reaches ``threshold`` link documents.
    """
    with Tasks(workers, ray_address) as tasks:
        return _minhash_stages(work, n, parts, num_perm, dtype, rows, tasks, verify, threshold)


def _minhash_stages(work, n, parts, num_perm, dtype, rows, tasks, verify, threshold) -> dict:
    each = functools.partial(_each, work, parts, tasks)
    facts = {"candidate_pairs": sum(each(minhash_bucket_task, n, num_perm, dtype, rows))}
    _remove(work, "buckets", parts, (".bin",))  # the largest files: gone before the next stage
    edges = "edges"
    if verify is not None:
        each(candidates_task, n)
        each(wanted_task)
        gather_wanted(work, parts, n)
        tasks.release()  # the shingle pass forks its own chunk workers
        verify()
        facts["verified_pairs"] = sum(each(verify_task, threshold))
        edges = "vedges"
    rounds = 0
    while sum(each(label_task, rounds, edges)):
        _remove(work, f"msg{rounds - 1}", parts)
        rounds += 1
    _remove(work, f"msg{rounds}", parts)
    for name in ("edges", "vedges", "wanted", "adj"):
        _remove(work, name, parts)
    each(roots_task)
    facts["clusters"] = sum(each(sizes_task, n, num_perm, dtype, verify is not None))
    each(order_task)
    facts["label_rounds"] = rounds + 1
    return facts


def _remove(work: str, name: str, parts: int, exts: tuple = (".npy", ".off.npy")) -> None:
    """Delete a stage's files once read (disk: see docs/dedup.md)."""
    for p in range(parts):
        for ext in exts:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(work, f"{name}-{p}{ext}"))


def iter_duplicates(work: str, parts: int) -> Iterator[np.ndarray]:
    """The DUP records in input order, one memory-mapped partition at a time."""
    for part in range(parts):
        yield _load(os.path.join(work, f"final-{part}.npy"), mmap=True)
