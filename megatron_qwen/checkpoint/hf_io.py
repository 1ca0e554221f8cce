"""Read and write Hugging Face checkpoints one tensor at a time.

Reading: safetensors shards are memory-mapped and each tensor is materialised only when asked
for; ``.bin`` shards load with ``weights_only=True`` (untrusted pickles never run code) and
``mmap=True``, one shard kept open at a time. Writing: tensors are buffered up to a shard size,
each shard written as it fills, then named ``model-0000i-of-0000n.safetensors`` with the index.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_qwen.checkpoint.finite import require_finite
from megatron_qwen.checkpoint.mapping import CheckpointError
from megatron_qwen.checkpoint.paths import inside

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


class HFCheckpointReader:
    """Tensor-by-tensor access to an HF checkpoint directory (safetensors or .bin, sharded or not)."""

    def __init__(self, directory: os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        self.config = read_json(self.dir / "config.json")
        self._open_path: Optional[Path] = None
        self._open: object = None
        self._file_of: Dict[str, Path] = self._locate()

    def _locate(self) -> Dict[str, Path]:
        for index_name in _INDEXES:
            index_path = self.dir / index_name
            if index_path.is_file():
                weight_map = read_json(index_path).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{index_path}: no 'weight_map'")
                files = {}
                for name, fname in weight_map.items():
                    path = inside(self.dir, fname, index_path)
                    if not path.is_file():
                        raise CheckpointError(f"{index_path}: tensor {name} is in {fname}, "
                                              "which does not exist")
                    files[name] = path
                return files
        shards = [self.dir / n for n in _SINGLES if (self.dir / n).is_file()]
        if not shards:  # shards without an index
            shards = sorted(self.dir.glob("*.safetensors")) or sorted(self.dir.glob("*.bin"))
        if not shards:
            raise CheckpointError(f"{self.dir}: no *.safetensors or *.bin weights found")
        files = {}
        for path in shards:
            for name in self._names_in(path):
                if name in files:
                    raise CheckpointError(f"{self.dir}: tensor {name} is in both "
                                          f"{files[name].name} and {path.name}")
                files[name] = path
        return files

    def _names_in(self, path: Path) -> List[str]:
        return list(self._handle(path).keys())

    def _handle(self, path: Path):
        if self._open_path != path:
            self._open = None  # drop the previous shard before opening the next
            try:
                if path.suffix == ".safetensors":
                    self._open = safe_open(str(path), framework="pt")
                else:
                    self._open = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    if not isinstance(self._open, dict):
                        raise CheckpointError(f"{path}: expected a state dict, got "
                                              f"{type(self._open).__name__}")
            except CheckpointError:
                raise
            except Exception as exc:  # corrupt or hostile file: one line, the file named
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{path}: cannot read weights ({msg})") from None
            self._open_path = path
        return self._open

    def names(self) -> List[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        path = self._file_of.get(name)
        if path is None:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing")
        handle = self._handle(path)
        tensor = handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]
        return require_finite(tensor, name, path)


class HFCheckpointWriter:
    """Collects tensors into safetensors shards of at most ``max_shard_bytes`` each."""

    def __init__(self, directory: os.PathLike, max_shard_bytes: int = 2 * 1024**3):
        self.dir = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().nbytes() != nbytes:  # a view would keep its whole storage
            tensor = tensor.clone()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        save_file(self._pending, str(self.dir / f"shard-{len(self._shards):05d}.tmp"),
                  metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        """Write the last shard, give every shard its final name and write the index."""
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        write_json(self.dir / "model.safetensors.index.json", index)


def write_json(path: Path, obj) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(out: os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out`` that becomes ``out`` only if the block succeeds.

    ``out`` must not exist yet (or be an empty directory), so a failed conversion leaves nothing
    behind and a finished one is never half-overwritten.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
