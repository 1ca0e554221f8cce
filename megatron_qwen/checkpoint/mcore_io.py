"""megatron-core ``torch_dist`` checkpoints, written and read without building the model.

A GPTModel's sharded state dict names each tensor by a layout-free key: the decoder layers are
stacked along a leading axis of ``num_layers`` (``decoder.layers.self_attention.linear_qkv.weight``
has global shape [L, 3h, h]), and tensor-parallel slices are offsets into the full tensor. So a
checkpoint written here from full tensors, one ``ShardedTensor`` per layer, is the same checkpoint a
model at any TP/PP/VPP would write, and loads into one at any layout. The one layout-dependent
shape is the vocabulary, padded to a multiple of 128 x TP: ``padded_vocab_size`` is recorded in the
saved model config, and :func:`load_model_weights` refuses a mismatch with a one-line error.

Directory layout (as Megatron-LM): ``DIR/latest_checkpointed_iteration.txt``, ``DIR/iter_NNNNNNN/``
(the dist checkpoint; its ``common.pt`` carries our metadata under ``megatron_qwen``), and
``DIR/config.yaml`` (the resolved ``model`` and ``parallel`` groups, usable as a recipe).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import yaml

from megatron_qwen.checkpoint.finite import require_finite, require_finite_state
from megatron_qwen.checkpoint.mapping import (
    GLOBAL_ROLES,
    LAYER_ROLES,
    CheckpointError,
    mcore_name,
)
from megatron_qwen.checkpoint.te_layout import LOCAL_TO_TE, load_model_state, match_checkpoint_layout
from megatron_qwen.config import ModelConfig, ParallelConfig
from megatron_qwen.runtime.distributed import world_of_one

META_KEY = "megatron_qwen"
TRACKER = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "config.yaml"
# Layer modules whose (empty, for local linears) ``_extra_state`` megatron-core checkpoints.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj",
                       "mlp.linear_fc1", "mlp.linear_fc2")
# Other spellings of our keys in checkpoints written by Transformer Engine layer specs.
_TE_ALIASES = LOCAL_TO_TE


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def ckpt_key(role: str) -> str:
    """The dist-checkpoint key of a role: the parameter name with the layer index removed."""
    name = mcore_name(role, 0 if role in LAYER_ROLES else None)
    return name.replace("decoder.layers.0.", "decoder.layers.")


# --------------------------------------------------------------------------- writing


def checkpoint_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """{dist-checkpoint key: global shape} of the tensors :func:`save_mcore_checkpoint` writes
    for ``cfg`` (layers stacked on axis 0, the vocabulary at ``cfg.padded_vocab_size`` rows)."""
    from megatron_qwen.checkpoint.mapping import Shape, mcore_shapes

    s = Shape.of(cfg, cfg.vocab_size_padded())
    out = {ckpt_key(role): shape for role, shape in mcore_shapes(s).items()}
    out.update({ckpt_key(role): (cfg.num_layers, *shape) for role, shape in mcore_shapes(s, 0).items()})
    return out


def _sharded_state_dict(tensors: Mapping[str, torch.Tensor], num_layers: int) -> dict:
    """ShardedTensors (one per layer, stacked on axis 0) for full megatron-core tensors."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    out: dict = {}
    for role in GLOBAL_ROLES:
        out[mcore_name(role)] = ShardedTensor.from_rank_offsets(ckpt_key(role), tensors[mcore_name(role)])
    for layer in range(num_layers):
        for role in LAYER_ROLES:
            name = mcore_name(role, layer)
            out[name] = ShardedTensor.from_rank_offsets(
                ckpt_key(role), tensors[name], (0, layer, num_layers), prepend_axis_num=1)
        for module in EXTRA_STATE_MODULES:
            key = f"decoder.layers.{module}._extra_state"
            out[f"decoder.layers.{layer}.{module}._extra_state"] = ShardedObject(
                key, None, (num_layers,), (layer,), replica_id=0)
    return out


def save_mcore_checkpoint(directory: Path, tensors: Mapping[str, torch.Tensor], cfg: ModelConfig,
                          parallel: ParallelConfig, meta: dict, iteration: int = 0) -> None:
    """Write full megatron-core tensors as a torch_dist checkpoint under ``directory``.

    ``directory`` must be new and empty (the caller's temporary directory); ``cfg`` carries the
    padded vocabulary size the embedding/output rows were padded to.
    """
    from megatron.core import dist_checkpointing

    from megatron_qwen.checkpoint import save_processes

    expected = cfg.padded_vocab_size
    for role in ("embedding", "output"):
        rows = tensors[mcore_name(role)].shape[0]
        if rows != expected:
            raise CheckpointError(f"{mcore_name(role)} has {rows} rows, expected the padded "
                                  f"vocabulary size {expected}")
    state = _sharded_state_dict(tensors, cfg.num_layers)
    shapes = checkpoint_shapes(cfg)
    for item in state.values():
        if item.key in shapes and tuple(item.global_shape) != shapes[item.key]:
            raise CheckpointError(f"{item.key} has global shape {tuple(item.global_shape)}, "
                                  f"expected {shapes[item.key]} for the model config")
    ckpt_dir = Path(directory) / iter_dir_name(iteration)
    ckpt_dir.mkdir(parents=True)
    state[META_KEY] = {**meta, "model": dataclasses.asdict(cfg),
                       "parallel": dataclasses.asdict(parallel)}
    state["checkpoint_version"] = 3.0
    state["iteration"] = iteration
    save_processes.install()  # megatron-core's save helpers die with this process
    with world_of_one():
        dist_checkpointing.save(state, str(ckpt_dir))
    (Path(directory) / TRACKER).write_text(f"{iteration}\n")
    recipe = {"model": dataclasses.asdict(cfg), "parallel": dataclasses.asdict(parallel)}
    (Path(directory) / CONFIG_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))


# --------------------------------------------------------------------------- reading


def resolve_checkpoint_dir(directory: os.PathLike) -> Path:
    """``DIR`` (with a tracker file) or ``DIR/iter_NNNNNNN`` -> the dist checkpoint directory."""
    directory = Path(directory)
    if (directory / "metadata.json").is_file():
        return directory
    tracker = directory / TRACKER
    if not tracker.is_file():
        raise CheckpointError(f"{directory}: no {TRACKER} and no metadata.json: not a "
                              "megatron-core checkpoint")
    text = tracker.read_text().strip()
    if text == "release":
        ckpt = directory / "release"
    elif text.isdigit():
        ckpt = directory / iter_dir_name(int(text))
    else:
        raise CheckpointError(f"{tracker}: expected an iteration number, got {text[:40]!r}")
    if not (ckpt / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt}: missing metadata.json (named by {tracker})")
    return ckpt


class McoreCheckpointReader:
    """Full tensors of a torch_dist checkpoint, one layer at a time, with its model config."""

    def __init__(self, directory: os.PathLike, model_cfg: Optional[ModelConfig] = None):
        from megatron_qwen.checkpoint import safe_load

        self.root = Path(directory)
        self.dir = resolve_checkpoint_dir(directory)
        with world_of_one():
            common = safe_load.load_common(self.dir)
            self._meta_tensors = safe_load.load_tensors_metadata(self.dir)
        self.meta: dict = dict(common.get(META_KEY) or {})
        self.cfg = model_cfg or self._model_config()
        self.num_layers = self.cfg.num_layers

    def _model_config(self) -> ModelConfig:
        fields = self.meta.get("model")
        source = f"{self.dir}/common.pt"
        if fields is None:  # a checkpoint written by the trainer: its resolved config beside it
            for path in (self.dir / CONFIG_FILE, self.root / CONFIG_FILE):
                if path.is_file():
                    fields = (yaml.safe_load(path.read_text()) or {}).get("model")
                    source = str(path)
                    break
        if not fields:
            raise CheckpointError(f"{self.dir}: no model config (no {META_KEY} metadata in "
                                  f"common.pt and no {CONFIG_FILE} beside the checkpoint)")
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in fields.items() if k in names})
        try:
            cfg.validate()
        except ValueError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        return cfg

    def _key(self, role: str) -> str:
        key = ckpt_key(role)
        if key not in self._meta_tensors and _TE_ALIASES.get(key) in self._meta_tensors:
            return _TE_ALIASES[key]
        if key not in self._meta_tensors:
            raise CheckpointError(f"{self.dir}: tensor {key} is missing")
        return key

    def global_shape(self, role: str) -> Tuple[int, ...]:
        return tuple(self._meta_tensors[self._key(role)].global_shape)

    def dtype(self) -> torch.dtype:
        return self._meta_tensors[self._key("embedding")].dtype

    @property
    def vocab_rows(self) -> int:
        """Embedding rows stored in this checkpoint (padded)."""
        return self.global_shape("embedding")[0]

    def load(self, layer: Optional[int] = None,
             roles: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
        """The global tensors (``layer=None``) or one layer's tensors, keyed by role.

        ``roles`` picks a subset: loading the embedding and the output layer one at a time keeps
        the peak at one vocabulary matrix (dist_checkpointing's read briefly holds ~1.4x).
        """
        from megatron.core.dist_checkpointing import ShardedTensor

        from megatron_qwen.checkpoint import safe_load

        request = {}
        for role in roles or (GLOBAL_ROLES if layer is None else LAYER_ROLES):
            meta = self._meta_tensors[self._key(role)]
            shape = tuple(meta.global_shape)
            if layer is None:
                request[role] = ShardedTensor.from_rank_offsets(
                    meta.key, torch.empty(shape, dtype=meta.dtype))
            else:
                if shape[0] != self.num_layers:
                    raise CheckpointError(f"{self.dir}: tensor {meta.key} stacks {shape[0]} layers, "
                                          f"the model config has {self.num_layers}")
                # a [1, ...] slice of the stacked tensor (not a prepended axis: megatron-core's
                # prepend-axis load path assumes the other layers are read by other ranks)
                request[role] = ShardedTensor.from_rank_offsets(
                    meta.key, torch.empty((1, *shape[1:]), dtype=meta.dtype),
                    (0, layer, self.num_layers))
        with world_of_one():
            loaded = safe_load.load(request, self.dir, validate_access_integrity=False)
        for role in request:
            name = self._key(role) if layer is None else f"{self._key(role)} (layer {layer})"
            require_finite(loaded[role], name, self.dir)
        return {role: loaded[role] if layer is None else loaded[role][0] for role in request}


# --------------------------------------------------------------------------- loading into a model


def load_model_weights(model_chunks: List[torch.nn.Module], directory: os.PathLike) -> dict:
    """Load a checkpoint's model weights into this rank's GPTModel chunks (any TP/PP/VPP).

    Returns the checkpoint's ``megatron_qwen`` metadata. Call it on every rank. A vocabulary
    padded for another TP is refused with a one-line error pointing at ``reshard``.
    """
    from megatron_qwen.checkpoint import safe_load

    ckpt = resolve_checkpoint_dir(directory)
    unwrapped = []
    for chunk in model_chunks:  # DDP / Float16Module wrappers hold the GPTModel as .module
        while hasattr(chunk, "module"):
            chunk = chunk.module
        unwrapped.append(chunk)
    model_chunks = unwrapped
    state = {}
    for i, chunk in enumerate(model_chunks):
        state[f"model{i}" if len(model_chunks) > 1 else "model"] = chunk.sharded_state_dict()
    match_checkpoint_layout(state, safe_load.load_tensors_metadata(ckpt))
    check_model_shapes(state, ckpt)
    loaded = safe_load.load(state, ckpt)
    require_finite_state({k: v for k, v in loaded.items() if k.startswith("model")}, ckpt)
    for i, chunk in enumerate(model_chunks):
        load_model_state(chunk, loaded[f"model{i}" if len(model_chunks) > 1 else "model"], ckpt)
    return dict(loaded.get(META_KEY) or {})


def check_model_shapes(model_state: Mapping[str, dict], ckpt: os.PathLike) -> None:
    """Every tensor of the model's sharded state dicts (``{"model": ..., "model1": ...}``) is in
    the checkpoint at the same global shape: a one-line error instead of megatron-core's page."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_qwen.checkpoint import safe_load

    saved = safe_load.load_tensors_metadata(ckpt)
    for sub in model_state.values():
        for sh in sub.values():
            if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                continue  # ShardedObjects (empty _extra_state) are checked by the load itself
            key, shape = sh.key, getattr(sh, "global_shape", None)
            if key not in saved:
                raise CheckpointError(f"{ckpt}: tensor {key} is missing from the checkpoint")
            have = tuple(saved[key].global_shape)
            if shape is not None and have != tuple(shape):
                vocab_only = len(have) == len(shape) and have[1:] == tuple(shape[1:])
                hint = ("run `convert_checkpoint.py reshard` for this layout (the vocabulary "
                        "padding depends on TP)" if vocab_only and "word_embeddings" in key
                        or vocab_only and key.startswith("output_layer") else
                        "the checkpoint holds a model of another shape")
                raise CheckpointError(f"{ckpt}: tensor {key} has global shape {have}, the model "
                                      f"expects {tuple(shape)}; {hint}")
