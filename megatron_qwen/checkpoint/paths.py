"""Names read from a checkpoint's own files (an index's shard names, a ``latest`` tag, a dist
checkpoint's data-file names) must stay inside that checkpoint: a hostile file must not make a
loader read ``/etc/...`` or a sibling directory.

The check is on the name as written (absolute, or ``..`` past the root, is refused); symbolic links
inside the directory are followed as usual, since the Hugging Face cache is made of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_qwen.checkpoint.mapping import CheckpointError


def inside(root: os.PathLike, name: str, source: os.PathLike) -> Path:
    """``root / name``, or a one-line error naming ``source`` (the file that holds ``name``)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{source}: expected a file name inside {root}, got {name!r}")
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == "." or normal == ".." or normal.startswith(".." + os.sep):
        raise CheckpointError(f"{source}: names {name!r}, which is outside {root}; refused")
    return Path(root) / normal
