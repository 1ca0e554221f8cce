"""``torch.load`` of a checkpoint file that can run no code, with a one-line error.

torch's weights-only unpickler rebuilds tensors and plain data (plus the classes registered with
``torch.serialization.add_safe_globals`` / ``safe_globals``) and refuses every other global.
"""

from __future__ import annotations

import os
import re

import torch

from megatron_qwen.checkpoint.mapping import CheckpointError


def one_line(exc: BaseException) -> str:
    """The telling line of an error message (torch's weights-only errors run to a page)."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"refuses to load {found.group(1)} (only tensors and plain data are read)"
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:  # anything else the weights-only unpickler stops at: not a torch.save file
        return f"not a readable torch.save file ({found.group(1).strip()})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def torch_load(source, name: os.PathLike, map_location="cpu"):
    """``torch.load(weights_only=True)`` of a path or buffer; a one-line error naming ``name``."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: missing") from None
    except CheckpointError:
        raise
    except Exception as exc:  # garbage makes the unpickler fail in any way: report it, one line
        detail = one_line(exc)
        if not detail.startswith(("refuses", "not a readable")):
            detail = f"not a readable torch.save file ({detail})"
        raise CheckpointError(f"{name}: {detail}") from None
