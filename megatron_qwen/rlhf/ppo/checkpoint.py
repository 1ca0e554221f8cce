"""PPO checkpoints: the trained engines through DeepSpeed's ``save_checkpoint`` (optimizer states
included), the frozen engines as Hugging Face directories (DeepSpeed cannot ``save_checkpoint`` a
ZeRO-3 engine that has no optimizer; the HF form also makes the checkpoint self-contained), plus
per-rank trainer state (step, prompt position, running reward statistics, RNG states), plus the
resolved config; and the actor's export to HF form.

Layout::

    SAVE/step_0000010/actor/...  critic/...                       (DeepSpeed's own layout)
    SAVE/step_0000010/ref/  reward/                               (HF form; reward = RM export layout)
    SAVE/step_0000010/trainer_state_rank0.pt ...                  (torch.save, loaded weights_only)
    SAVE/step_0000010/config.yaml
    SAVE/latest                                                   (the tag; written last)

``latest`` is written atomically by rank 0 after every rank has finished writing, so a run killed
mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_qwen.checkpoint.paths import inside
from megatron_qwen.config import save_resolved
from megatron_qwen.rlhf import hf_model
from megatron_qwen.runtime import rng_state


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed (message names the path)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save(save_dir: str, step: int, engines, trainer_state: dict, cfg, save_frozen: bool = True) -> Path:
    """Write checkpoint ``step`` (all ranks call this)."""
    root = Path(save_dir)
    tag = f"step_{step:07d}"
    ckpt = root / tag
    if _rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    _barrier()
    for name in ("actor", "critic"):
        getattr(engines, name).save_checkpoint(str(ckpt / name), tag="engine", save_latest=False)
    if save_frozen:
        export_actor(engines.ref, str(ckpt / "ref"))
        hf_model.export_with_head(engines.reward, ckpt / "reward", reward_stats=engines.reward_stats)
    state_file = ckpt / f"trainer_state_rank{_rank()}.pt"
    tmp = state_file.with_name(f".{state_file.name}.tmp")
    torch.save({**trainer_state, "rng": rng_state.capture()}, tmp)
    tmp.replace(state_file)
    if _rank() == 0:
        save_resolved(cfg, ckpt / "config.yaml")
    _barrier()
    if _rank() == 0:
        _atomic_write_text(root / "latest", tag + "\n")
    _barrier()
    return ckpt


def latest(load_dir: str) -> Optional[Path]:
    """The newest complete checkpoint under ``load_dir`` (None if there is none yet)."""
    marker = Path(load_dir) / "latest"
    if not marker.is_file():
        return None
    ckpt = inside(load_dir, marker.read_text().strip(), marker)
    if not ckpt.is_dir():
        raise CheckpointError(f"{marker} names {ckpt.name}, which does not exist")
    return ckpt


def load(load_dir: str, engines) -> Optional[dict]:
    """Restore engines and return this rank's trainer state (None when there is no checkpoint)."""
    ckpt = latest(load_dir)
    if ckpt is None:
        return None
    for name in ("actor", "critic"):
        path = ckpt / name
        if not path.is_dir():
            raise CheckpointError(f"{ckpt}: missing the {name} engine")
        load_path, _ = getattr(engines, name).load_checkpoint(str(path), tag="engine")
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load the {name} engine")
    state_file = ckpt / f"trainer_state_rank{_rank()}.pt"
    if not state_file.is_file():  # resumed on more ranks than saved: rank 0's position and stats
        state_file = ckpt / "trainer_state_rank0.pt"
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    rng_state.restore(state.pop("rng"))
    return state


def frozen_sources(load_dir: Optional[str]) -> dict:
    """The checkpoint's own copies of the frozen engines, to build them from on resume."""
    ckpt = latest(load_dir) if load_dir else None
    if ckpt is None:
        return {}
    return {f"{name}_path": str(ckpt / name) for name in ("ref", "reward") if (ckpt / name / "config.json").is_file()}


def export_actor(actor_engine, out_dir: str, source_dir: Optional[str] = None) -> Optional[Path]:
    """The actor (or the reference) as a Hugging Face directory (safetensors + config), loadable
    by ``AutoModelForCausalLM``. All ranks call this (ZeRO-3 gathers); rank 0 writes."""
    state = hf_model.full_state_dict(actor_engine)
    path = None
    if state is not None:
        module = actor_engine.module

        def write(tmp: Path) -> None:
            module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            if source_dir is not None:
                for name in hf_model.COPIED_FILES:
                    if (Path(source_dir) / name).is_file():
                        shutil.copy2(Path(source_dir) / name, tmp / name)

        hf_model._write_dir_atomically(Path(out_dir), write)
        path = Path(out_dir)
    _barrier()
    return path
