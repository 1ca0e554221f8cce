"""Every RNG a training step can draw from, as plain tensors and ints (``weights_only``-loadable).

Dropout draws from torch's CPU or CUDA generator; samplers and shuffles may use Python's
``random`` or numpy's global state. A resumed run restores all of them so its steps draw exactly
what the uninterrupted run drew. numpy's state is kept as a tensor of its key plus ints and a
float, never as the numpy array itself, so the restricted loaders read it without an allow-list.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    """This process's RNG states."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    """Put back what :func:`capture` took (the CUDA states only where there are GPUs)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
