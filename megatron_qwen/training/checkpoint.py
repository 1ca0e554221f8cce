"""Training checkpoints: megatron-core distributed checkpoints in Megatron-LM's layout.

``DIR/iter_NNNNNNN/`` holds one ``torch_dist`` checkpoint with the model, the optimizer, the LR
scheduler, every RNG, the iteration and the consumed-sample count;
``DIR/latest_checkpointed_iteration.txt`` points at the newest. The distributed optimizer is saved
``dp_reshardable`` by default (each rank writes its own shard of the fp32 params and Adam moments
as they lie in its buffers: no gather, no host copy; it reloads only at the layout it was saved
at) or, with ``--dist-ckpt-optim-fully-reshardable``, ``fully_reshardable`` (gathered into model
space: any TP/PP/DP reloads it). Saves and loads are fully parallel over the data-parallel ranks
(megatron-core's FullyParallel wrappers, as Megatron-LM by default); ``--async-save`` writes in a
forked process while training goes on. A checkpoint is written to ``iter_NNNNNNN.tmp`` and renamed
once complete (for an async save: at its finalize, after every rank's writer is done), and the
pointer is replaced atomically after, so a job killed mid-save leaves the previous checkpoint
current. A checkpoint with model weights only (``tools/convert_checkpoint.py``'s output) loads as a
fine-tuning start: weights in, iteration 0, fresh optimizer.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_qwen.checkpoint import safe_load, save_processes
from megatron_qwen.checkpoint.finite import require_finite_state
from megatron_qwen.checkpoint.mcore_io import check_model_shapes
from megatron_qwen.checkpoint.te_layout import load_model_state, match_checkpoint_layout
from megatron_qwen.config import ConfigError, to_dict
from megatron_qwen.runtime import mcore_version

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "config.yaml"
TRAIN_STATE_KEY = "megatron_qwen_train_state"  # present in common.pt of full training checkpoints
DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"
LAYOUT_NAMES = {"tensor_model_parallel_size": "TP", "pipeline_model_parallel_size": "PP",
                "virtual_pipeline_model_parallel_size": "VPP", "data_parallel_size": "DP"}
LAYOUT_FIELDS = tuple(LAYOUT_NAMES)[:3]  # in the parallel config; DP follows from the world size


def sharded_metadata(sharding_type: str) -> dict:
    """megatron-core's sharded-state-dict metadata; saved as the checkpoint's content metadata,
    so a load reads the optimizer in the form it was written in."""
    return {"distrib_optim_sharding_type": sharding_type,
            "chained_optim_avoid_prefix": True, "singleton_local_shards": False}


def save_sharding_type(ck) -> str:
    return FULLY_RESHARDABLE if ck.dist_ckpt_optim_fully_reshardable else DP_RESHARDABLE


def iter_dir(root: os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (its sharded keys are layout-free)."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def read_tracker(root: os.PathLike) -> Optional[int]:
    """The iteration named by ``root``'s tracker file, or None when there is no checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{tracker}: expected an iteration number, got {text[:40]!r}")
    return int(text)


def has_checkpoint(root: os.PathLike) -> bool:
    """A tracker file, or a bare dist-checkpoint directory, is there."""
    return read_tracker(root) is not None or (Path(root) / "metadata.json").is_file()


def check_load_paths(ck) -> None:
    """Refuse, before anything is built, a ``--load`` / ``--pretrained-checkpoint`` that names
    something other than a checkpoint.

    Only ``--load`` equal to ``--save`` (the requeue pattern: slurm/common.sh passes both) may be
    missing or hold no checkpoint yet (empty, or only a killed first save's ``*.tmp``): that is a
    fresh start. Anything else that is not a checkpoint would silently train from scratch.
    """
    if ck.load:
        load = Path(ck.load)
        if load.exists() and not load.is_dir():
            raise ConfigError(f"--load {load}: a file, not a checkpoint directory")
        if not has_checkpoint(load):
            own_save = ck.save is not None and Path(ck.save).resolve() == load.resolve()
            if not own_save:
                state = "does not exist" if not load.exists() else f"holds no checkpoint (no {TRACKER})"
                raise ConfigError(f"--load {load}: {state}; only --load equal to --save may start "
                                  "from scratch")
            other = sorted(p.name for p in load.iterdir() if not p.name.endswith(".tmp")) \
                if load.is_dir() else []
            if other:
                raise ConfigError(f"--load {load}: not a checkpoint directory (no {TRACKER}; it "
                                  f"holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''})")
    resumes = ck.load and has_checkpoint(ck.load)
    if ck.pretrained_checkpoint and not resumes and not has_checkpoint(ck.pretrained_checkpoint):
        raise ConfigError(f"--pretrained-checkpoint {ck.pretrained_checkpoint}: no checkpoint there")


def _rng_state() -> dict:
    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: Optional[dict]) -> ShardedObject:
    """One RNG state per (PP, TP) rank; DP replicas share it (Megatron's seeding)."""
    pp, tp = (parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_tensor_model_parallel_world_size())
    return ShardedObject(
        "rng_state", state, (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(),
         parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _model_state(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _dp_group():
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _save_strategy():
    """torch_dist, the writes of DP-replicated tensors spread over the DP ranks."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())


def _load_strategy(ckpt: Path):
    """torch_dist, each DP-replicated tensor read by one DP rank and broadcast to the others."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(ckpt)), _dp_group())


_async_queue = None  # megatron-core's AsyncCallsQueue, made at the first --async-save


def finalize_async_saves(blocking: bool = True) -> None:
    """Publish the async saves whose writers are done on every rank (all of them, waiting, with
    ``blocking``): only then does a checkpoint become ``latest``. Call on every rank; a no-op
    without async saves."""
    if _async_queue is not None:
        _async_queue.maybe_finalize_async_calls(blocking=blocking)


def abort_async_saves() -> None:
    """Kill the writers of unfinished async saves (after an error; no collective, so a rank that
    fails alone does not hang here): their ``.tmp`` stays unpublished."""
    global _async_queue
    if _async_queue is not None:
        for call in _async_queue.async_calls:  # megatron-core's queue.close(abort=True) leaves
            call.async_caller.close(abort=True)  # its per-save (forked) writers running
        _async_queue = None


def _publish(root: Path, tmp: Path, final: Path, iteration: int, cfg, keep_last_k) -> None:
    """Every rank's shards are written: rename ``tmp`` into place and point the tracker at it."""
    _barrier()
    if _rank0():
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if final.exists():  # the same iteration saved again (e.g. SIGTERM right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / (TRACKER + ".tmp")
        pointer.write_text(f"{iteration}\n")
        os.replace(pointer, root / TRACKER)
        (root / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if keep_last_k:
            prune_checkpoints(root, keep_last_k)
        print(f"saved checkpoint iteration {iteration} to {root}", flush=True)
    _barrier()


def save_checkpoint(root: os.PathLike, iteration: int, model_chunks, optimizer, scheduler,
                    consumed_samples: int, cfg, keep_last_k: Optional[int] = None) -> Path:
    """Write ``root/iter_NNNNNNN`` atomically and point the tracker at it. Call on every rank.

    With ``cfg.checkpoint.async_save`` this returns once the state is handed to a writer process;
    the checkpoint is published by a later ``finalize_async_saves`` (the previous async save is
    always finalized before a new one starts)."""
    global _async_queue
    root = Path(root)
    final = iter_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    asynchronous = cfg.checkpoint.async_save
    finalize_async_saves(blocking=True)
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that was killed
        tmp.mkdir()
    _barrier()
    save_processes.install()  # megatron-core's save helpers die with this process
    metadata = sharded_metadata(save_sharding_type(cfg.checkpoint))
    state = _model_state(model_chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
    state["rng_state"] = _rng_sharded_object(_rng_state())
    state["opt_param_scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    state["checkpoint_version"] = 3.0
    state[TRAIN_STATE_KEY] = {"config": to_dict(cfg), "world_size": torch.distributed.get_world_size()}
    extra = mcore_version.async_save_arguments() if asynchronous else {}
    request = dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(),
                                      async_sharded_save=asynchronous, content_metadata=dict(metadata),
                                      **extra)
    if not asynchronous:
        _publish(root, tmp, final, iteration, cfg, keep_last_k)
        return final
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    request.add_finalize_fn(lambda: _publish(root, tmp, final, iteration, cfg, keep_last_k))
    if _async_queue is None:
        _async_queue = AsyncCallsQueue()
    _async_queue.schedule_async_request(request)
    return final


def prune_checkpoints(root: os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete ``iter_*`` directories; return those deleted."""
    done = sorted(p for p in Path(root).glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    doomed = done[:-keep] if keep else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _saved_sharding_type(common: dict) -> str:
    """The form the distributed optimizer was saved in (checkpoints written before the content
    metadata was read are ``fully_reshardable``, as everything was then)."""
    content = common.get("content_metadata") or {}
    return content.get("distrib_optim_sharding_type", FULLY_RESHARDABLE)


def _layout(parallel: dict, world_size: int) -> dict:
    """TP, PP, VPP (1 without interleaving) and DP of a run's parallel config group."""
    layout = {f: parallel.get(f) or 1 for f in LAYOUT_FIELDS}
    layout["data_parallel_size"] = world_size // (layout["tensor_model_parallel_size"]
                                                  * layout["pipeline_model_parallel_size"])
    return layout


def _require_saved_layout(root: Path, ckpt: Path, common: dict, cfg) -> None:
    """A dp_reshardable optimizer state is the saving ranks' buffer shards: refuse another layout
    with one line, before megatron-core fails deep in the load (or loads the wrong slices)."""
    saved = _layout(common[TRAIN_STATE_KEY]["config"]["parallel"], common[TRAIN_STATE_KEY]["world_size"])
    here = _layout(to_dict(cfg.parallel), torch.distributed.get_world_size())
    if saved != here:
        def fmt(layout):
            return " ".join(f"{name}={layout[field]}" for field, name in LAYOUT_NAMES.items())
        raise ConfigError(
            f"--load {root}: {ckpt.name} holds the distributed optimizer as dp_reshardable, saved at "
            f"{fmt(saved)}, and this run is {fmt(here)}; resume at the saved layout and save again "
            "with --dist-ckpt-optim-fully-reshardable to change it (or pass --no-load-optim)")


def load_checkpoint(root: os.PathLike, model_chunks, optimizer, scheduler, cfg) -> tuple[int, int]:
    """Load ``root``'s latest checkpoint into the model (and, for a training checkpoint, the
    optimizer, scheduler and RNG). Returns (iteration, consumed_samples): (0, 0) for a
    weights-only checkpoint or with ``--finetune``. Call on every rank."""
    root = Path(root)
    iteration = read_tracker(root)
    if iteration is None:
        if (root / "metadata.json").is_file():  # a bare dist-checkpoint directory
            ckpt = root
        else:
            raise ConfigError(f"--load {root}: no {TRACKER} (and not a checkpoint directory)")
    else:
        ckpt = iter_dir(root, iteration)
    if not (ckpt / "metadata.json").is_file():
        raise ConfigError(f"--load {root}: {ckpt} is not a complete checkpoint (no metadata.json)")
    common = safe_load.load_common(ckpt)
    ck = cfg.checkpoint
    full = TRAIN_STATE_KEY in common and not ck.finetune
    state = _model_state(model_chunks)
    match_checkpoint_layout(state, safe_load.load_tensors_metadata(ckpt))  # TE <-> local names
    check_model_shapes(state, ckpt)
    if full and not ck.no_load_optim:
        saved_dist = common[TRAIN_STATE_KEY]["config"]["parallel"]["use_distributed_optimizer"]
        if saved_dist != cfg.parallel.use_distributed_optimizer:
            flag = "with" if saved_dist else "without"
            raise ConfigError(
                f"--load {root}: the checkpoint was saved {flag} --use-distributed-optimizer; "
                f"resume with the same setting (or pass --no-load-optim to start a fresh optimizer)")
        sharding = _saved_sharding_type(common)
        if saved_dist and sharding == DP_RESHARDABLE:
            _require_saved_layout(root, ckpt, common, cfg)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=sharded_metadata(sharding))
    same_layout = False
    if full and not ck.no_load_rng:
        saved = common[TRAIN_STATE_KEY]["config"]["parallel"]
        same_layout = (saved["tensor_model_parallel_size"] == cfg.parallel.tensor_model_parallel_size
                       and saved["pipeline_model_parallel_size"] == cfg.parallel.pipeline_model_parallel_size)
        if same_layout:
            state["rng_state"] = _rng_sharded_object(None)
    loaded = safe_load.load(state, ckpt, sharded_strategy=_load_strategy(ckpt),
                            strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    require_finite_state({k: v for k, v in loaded.items() if k.startswith("model")}, ckpt)
    for key, chunk in zip(sorted(k for k in loaded if k.startswith("model")), model_chunks):
        load_model_state(unwrap(chunk), loaded[key], ckpt)
    if not full:
        if _rank0():
            print(f"loaded model weights from {ckpt} (weights only: iteration 0, fresh optimizer)",
                  flush=True)
        return 0, 0
    if "optimizer" in loaded:
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["opt_param_scheduler"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    it, consumed = int(common["iteration"]), int(common["consumed_samples"])
    if _rank0():
        note = "" if same_layout or ck.no_load_rng else " (layout changed: RNG state re-seeded)"
        print(f"resumed from {ckpt}: iteration {it}, {consumed} samples consumed{note}", flush=True)
    return it, consumed
