"""Hostile checkpoint files for the safety tests: each plants a pickle that, if unpickled by a
loader that runs code, writes a marker file."""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import torch


class Payload:
    """Unpickles as ``exec(...)``: writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def iter_dir(root: Path) -> Path:
    return root / f"iter_{int((root / 'latest_checkpointed_iteration.txt').read_text()):07d}"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def plant_metadata(ckpt: Path, marker: Path) -> Path:
    """A payload inside ``.metadata`` (read by torch with plain pickle.load)."""
    path = iter_dir(ckpt) / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.planner_data = {"x": Payload(marker)}
    path.write_bytes(pickle.dumps(metadata))
    return path


def plant_common(ckpt: Path, marker: Path) -> Path:
    """A payload inside ``common.pt``. megatron-core 0.19 keeps the common state inside the
    checkpoint instead; a ``common.pt`` planted beside it is still read first (by 0.19 and here)."""
    path = iter_dir(ckpt) / "common.pt"
    if path.is_file():
        common = torch.load(path, weights_only=True)
    else:
        from megatron_qwen.checkpoint.safe_load import load_common

        common = load_common(iter_dir(ckpt))
    common["x"] = Payload(marker)
    torch.save(common, path)
    return path


def plant_byte_item(ckpt: Path, marker: Path) -> Path:
    """A payload as a byte item of a ``.distcp`` (torch's planner: torch.load(weights_only=False)):
    appended to one data file, and the metadata of that file's byte items pointed at it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = iter_dir(ckpt) / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())
    byte_keys = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    blob = buf.getvalue()
    items = [info for index, info in metadata.storage_data.items() if index.fqn in byte_keys]
    planted = iter_dir(ckpt) / items[0].relative_path  # the byte items of one data file
    offset = planted.stat().st_size
    with open(planted, "ab") as f:
        f.write(blob)
    for info in items:
        if info.relative_path == planted.name:
            info.offset, info.length = offset, len(blob)
    meta_path.write_bytes(pickle.dumps(metadata))
    return planted


def plant_deepspeed(ckpt: Path, marker: Path) -> Path:
    """A payload in a DeepSpeed ``mp_rank_00_model_states.pt``."""
    tag = (ckpt / "latest").read_text().strip()
    path = next((ckpt / tag).glob("*model_states.pt"))
    state = torch.load(path, weights_only=False)
    state["x"] = Payload(marker)
    torch.save(state, path)
    return path
