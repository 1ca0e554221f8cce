"""Reading checkpoints without running code from them.

A pickle may name any callable, so a planted checkpoint file can run code on load. The pickles
this project reads, and how each is read here:

* a ``torch_dist`` checkpoint's ``.metadata``: torch's ``FileSystemReader`` unpickles it with plain
  ``pickle.load``. :class:`SafeFileSystemReader` reads it with an unpickler that admits only
  :data:`METADATA_CLASSES` and the torch dtypes (what torch and megatron-core write there), and
  checks every data-file name it holds stays inside the checkpoint and every byte range it names
  is in its file (a truncated ``.distcp`` is named before anything is read);
* the byte items inside ``*.distcp`` (RNG states, ``_extra_state``): torch's load planner uses
  ``torch.load(weights_only=False)``; the reader first passes each through torch's weights-only
  unpickler;
* ``common.pt``: read with ``torch.load(weights_only=True)`` (megatron-core's own read relies on
  torch's default, which an environment variable can flip);
* DeepSpeed engine states: see ``megatron_qwen/rlhf/safe_engine.py``.

Every torch_dist read in the project goes through :func:`load_common`,
:func:`load_tensors_metadata` and :func:`load`; :func:`install` points megatron-core's reader
factory at :class:`SafeFileSystemReader` so nothing else in the process can bypass it. Errors are
one line (:class:`CheckpointError`) naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_qwen.checkpoint.mapping import CheckpointError
from megatron_qwen.checkpoint.paths import inside
from megatron_qwen.checkpoint.weights_only import one_line, torch_load
from megatron_qwen.runtime import mcore_version

_DCP = "torch.distributed.checkpoint"
# Everything torch (2.13) and megatron-core (0.16.1) pickle into a torch_dist ``.metadata``, as
# found by unpickling the checkpoints the trainer and the converter write; dtypes are added below.
METADATA_CLASSES = frozenset({
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps "torch.strided" to the layout object
    (f"{_DCP}.filesystem", "_StorageInfo"),
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
})


class _MetadataUnpickler(pickle.Unpickler):
    """Plain data, the classes of :data:`METADATA_CLASSES` and torch dtypes; nothing else."""

    def __init__(self, stream, source: str):
        super().__init__(stream)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.source}: refuses to load {module}.{name} (a checkpoint's "
                              "metadata holds only torch's checkpoint records)")


class SafeFileSystemReader(FileSystemReader):
    """torch's reader with the metadata and the byte items read as described above. The
    metadata is read once per reader (megatron-core's cached reader changed its cache between
    versions: 0.16 per reader, 0.19 per process and path; a per-reader one is what 0.16 did)."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self._cached_metadata = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._cached_metadata is None:
            path = self._get_metadata_path(kwargs.get("rank"))
            try:
                with open(path, "rb") as stream:
                    metadata = _MetadataUnpickler(stream, str(path)).load()
            except CheckpointError:
                raise
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError,
                    OSError) as exc:
                raise CheckpointError(f"{path}: not a checkpoint metadata file "
                                      f"({one_line(exc)})") from None
            _check_storage(Path(self.path), metadata, path)
            if getattr(metadata, "storage_meta", None) is None:  # as torch's read_metadata
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._cached_metadata = metadata
        return self._cached_metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _CheckedBytes(planner, self))


def _check_storage(root: Path, metadata, source: Path) -> None:
    """Every data file named stays inside ``root`` and holds the byte ranges named in it."""
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{source}: not a checkpoint metadata file (no storage records)")
    sizes: dict = {}
    for info in metadata.storage_data.values():
        rel = info.relative_path
        if rel not in sizes:
            path = inside(root, rel, source)
            sizes[rel] = path.stat().st_size if path.is_file() else None
        if sizes[rel] is None:
            raise CheckpointError(f"{root / rel}: missing (named by {source})")
        if info.offset + info.length > sizes[rel]:
            raise CheckpointError(f"{root / rel}: truncated: {sizes[rel]} bytes, {source} names "
                                  f"bytes up to {info.offset + info.length}")


class _CheckedBytes:
    """A load planner whose byte items pass torch's weights-only unpickler before the real one."""

    def __init__(self, planner, reader):
        self._planner, self._reader = planner, reader

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        info = self._reader.storage_data[read_item.storage_index]
        torch_load(value, Path(self._reader.path) / info.relative_path)  # raises on any code
        value.seek(0)
        self._planner.load_bytes(read_item, value)


_installed = False


def _safe_reader(checkpoint_dir, *args, **kwargs) -> SafeFileSystemReader:
    """megatron-core's reader factory, whatever options its version passes (metadata caching,
    0.17+'s async strategy). The metadata is read here, once per reader: a refused or broken one
    raises its one-line error now, not wrapped in the AssertionError torch's ``dcp.load`` makes
    of a failed metadata read (the path 0.19 takes)."""
    reader = SafeFileSystemReader(checkpoint_dir)
    reader.read_metadata()
    return reader


def install() -> None:
    """Make every megatron-core read of a torch_dist checkpoint go through
    :class:`SafeFileSystemReader` and :func:`load_common`."""
    global _installed
    if _installed:
        return
    mcore_version.route_checkpoint_reads(_safe_reader, load_common)
    _installed = True


@contextmanager
def _reading(ckpt_dir: os.PathLike) -> Iterator[None]:
    """Install the safe reader; turn the read's errors into one line naming ``ckpt_dir``."""
    install()
    try:
        yield
    except CheckpointError:
        raise
    except CheckpointException as exc:  # torch's per-rank wrapper: report the first failure
        failures = list(exc.failures.values())  # (exception, traceback) per rank
        first = failures[0][0] if failures and isinstance(failures[0], tuple) else exc
        if isinstance(first, CheckpointError):
            raise first from None
        raise CheckpointError(f"{ckpt_dir}: cannot read the checkpoint ({one_line(first)})") from None
    except (CheckpointingException, pickle.UnpicklingError, EOFError, RuntimeError, OSError,
            AssertionError, KeyError) as exc:
        raise CheckpointError(f"{ckpt_dir}: cannot read the checkpoint ({one_line(exc)})") from None


def load_common(ckpt_dir: os.PathLike) -> dict:
    """The common (non-tensor) state of a torch_dist checkpoint, tensors and plain data only:
    ``common.pt`` (megatron-core 0.16-0.18) or the ``common_state`` object inside the checkpoint
    (0.19), whichever megatron-core version is installed."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / mcore_version.COMMON_FILE
    if path.is_file() or not (ckpt_dir / ".metadata").is_file():
        common = torch_load(path, path)
    else:
        path = ckpt_dir / ".metadata"
        state = {mcore_version.COMMON_STATE_KEY: io.BytesIO()}
        try:
            with _reading(ckpt_dir):
                dcp.load(state, storage_reader=_safe_reader(ckpt_dir), no_dist=True)
        except CheckpointError as exc:
            if "Missing key" not in str(exc):
                raise
            raise CheckpointError(f"{ckpt_dir / mcore_version.COMMON_FILE}: missing (and no common "
                                  "state inside the checkpoint)") from None
        common = state[mcore_version.COMMON_STATE_KEY]
        if isinstance(common, io.BytesIO):
            common = torch_load(common, path)
        common = common[0] if isinstance(common, list) and len(common) == 1 else common
    if not isinstance(common, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(common).__name__}")
    return common


def load_tensors_metadata(ckpt_dir: os.PathLike) -> dict:
    """megatron-core's ``load_tensors_metadata`` through the safe reader."""
    with _reading(ckpt_dir):
        return dist_checkpointing.load_tensors_metadata(str(ckpt_dir))


def load(sharded_state_dict: dict, ckpt_dir: os.PathLike, **kwargs) -> dict:
    with _reading(ckpt_dir):
        return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir),
                                       **mcore_version.load_arguments(load_common), **kwargs)
