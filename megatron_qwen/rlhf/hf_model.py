"""The Hugging Face form of Qwen for the DeepSpeed side: load, wrap with a head, export.

The reward model, the PPO critic, actor and reference all start from a directory in the qwen2
layout (safetensors + config.json, what ``tools/convert_checkpoint.py`` writes). A model with a
head is exported as one directory that this module loads back with no conversion:

    DIR/config.json                 the backbone's Qwen2Config
    DIR/model.safetensors           backbone weights (Qwen2Model names: embed_tokens..., norm)
    DIR/value_head.safetensors      the ScalarHead ("proj.weight")
    DIR/reward_stats.json           reward mean/std/count on the data it was scored on (optional)
    DIR/*.tiktoken, tokenizer files copied from the source directory when present

Nothing here reaches a hub: every load is ``local_files_only``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from megatron_qwen.rlhf.heads import (ScalarHead, gather_at, last_token_index,
                                      position_ids_from_mask)

HEAD_FILE = "value_head.safetensors"
STATS_FILE = "reward_stats.json"
BACKBONE_FILE = "model.safetensors"
# Files copied along with an export so the directory stays self-contained for tokenization.
COPIED_FILES = ("qwen.tiktoken", "tokenizer_config.json", "tokenizer.json", "generation_config.json")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_model_dir(path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path


class QwenWithHead(nn.Module):
    """A Qwen2 backbone (transformers' ``Qwen2Model``) plus a :class:`ScalarHead`.

    ``forward`` gives one value per token (the critic's reading); ``reward`` reads the value at
    each sequence's end token (the reward model's reading).
    """

    def __init__(self, backbone: nn.Module, head: Optional[ScalarHead] = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else ScalarHead(backbone.config.hidden_size)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[b, s] token ids -> [b, s] float32 values.

        Positions are counted over real tokens (from the mask) unless given, so left and right
        padding give the same values at the same tokens.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state
        return self.head(hidden)

    def reward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               end_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[b] rewards read at ``end_index`` (default: the last real token of each row)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if end_index is None:
            end_index = last_token_index(attention_mask)
        return gather_at(self(input_ids, attention_mask), end_index)

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable()


# --------------------------------------------------------------------------- loading


def load_backbone(path, dtype="float32") -> nn.Module:
    """transformers' ``Qwen2Model`` from a qwen2 directory (a causal-LM checkpoint works too:
    its ``lm_head`` is left out)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    path = _check_model_dir(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the causal LM's lm_head is "unexpected" here, by design
    try:
        model = AutoModel.from_pretrained(str(path), dtype=_dtype(dtype), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not hasattr(model, "embed_tokens"):
        raise ValueError(f"{path}: {type(model).__name__} is not a bare decoder (expected Qwen2Model)")
    return model


def load_causal_lm(path, dtype="float32") -> nn.Module:
    """transformers' ``Qwen2ForCausalLM`` from a qwen2 directory: the PPO actor and reference."""
    from transformers import AutoModelForCausalLM

    path = _check_model_dir(path)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype), local_files_only=True)


def load_with_head(path, dtype="float32", require_head: bool = False) -> QwenWithHead:
    """A backbone + head from ``path``.

    With a ``value_head.safetensors`` in the directory (a reward-model export) the head is loaded;
    without one (a pretrained or SFT model) a fresh head is initialised from torch's current RNG
    state, unless ``require_head`` (the PPO critic and reward engines insist on a trained head).
    """
    from transformers import AutoConfig

    path = _check_model_dir(path)
    hidden_size = AutoConfig.from_pretrained(str(path), local_files_only=True).hidden_size
    # the head before the backbone: a fresh head's draws must not depend on the RNG the load
    # consumes (under ZeRO-3's zero.Init the backbone's initialisers run, in a plain load not)
    head = ScalarHead(hidden_size)
    head_file = path / HEAD_FILE
    if head_file.is_file():
        state = load_file(str(head_file))
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{head_file}: head weights do not match (missing {missing}, "
                             f"unexpected {unexpected})")
        if head.proj.weight.shape[1] != hidden_size:
            raise ValueError(f"{head_file}: head width {head.proj.weight.shape[1]} != "
                             f"hidden_size {hidden_size}")
    elif require_head:
        raise FileNotFoundError(f"{path}: no {HEAD_FILE}; expected a reward-model export")
    backbone = load_backbone(path, dtype)
    return QwenWithHead(backbone, head.to(_dtype(dtype)))


def load_reward_stats(path) -> Optional[dict]:
    """The reward statistics saved with an export ({"mean", "std", "count", ...}) or None."""
    file = Path(path) / STATS_FILE
    if not file.is_file():
        return None
    try:
        stats = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    for key in ("mean", "std"):
        if not isinstance(stats.get(key), (int, float)):
            raise ValueError(f"{file}: field {key!r} missing or not a number")
    return stats


# --------------------------------------------------------------------------- export


def full_state_dict(engine_or_module) -> Optional[dict]:
    """The whole, unpartitioned state dict on rank 0 (None on other ranks under ZeRO-3).

    Works for a plain module, a DeepSpeed engine of any ZeRO stage. Under ZeRO-3 every rank
    must call it (the parameters are gathered layer by layer).
    """
    import torch.distributed as dist

    if hasattr(engine_or_module, "zero_optimization_partition_weights"):
        engine = engine_or_module
        if engine.zero_optimization_partition_weights():
            return engine._zero3_consolidated_16bit_state_dict()
        module = engine.module
    else:
        module = engine_or_module
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def write_dir_atomically(out_dir: Path, write) -> None:
    """Call ``write(tmp_dir)`` then rename tmp_dir onto out_dir (replacing an older export)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkdtemp (and some writers) create owner-only entries; give the usual permissions
        os.chmod(tmp, 0o777 & ~umask)
        for entry in tmp.iterdir():
            if entry.is_file():
                os.chmod(entry, 0o666 & ~umask)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old{os.getpid()}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_write_dir_atomically = write_dir_atomically  # the earlier private name, still used by ppo/checkpoint.py


def save_with_head(state_dict: dict, config, out_dir, reward_stats: Optional[dict] = None,
                   source_dir=None) -> Path:
    """Write a :class:`QwenWithHead` state dict as an export directory (rank 0 only).

    ``state_dict`` holds ``backbone.*`` and ``head.*`` keys (from :func:`full_state_dict`);
    ``config`` is the backbone's ``Qwen2Config``. Tokenizer files are copied from ``source_dir``.
    """
    backbone = {k[len("backbone."):]: v.contiguous().clone()
                for k, v in state_dict.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v.contiguous().clone() for k, v in state_dict.items()
            if k.startswith("head.")}
    if not backbone or not head:
        raise ValueError("state dict has no backbone.* or no head.* keys: not a QwenWithHead")

    config = copy.deepcopy(config)
    config.dtype = next(iter(backbone.values())).dtype  # record what the weights are stored in

    def write(tmp: Path) -> None:
        config.to_json_file(str(tmp / "config.json"))
        save_file(backbone, str(tmp / BACKBONE_FILE), metadata={"format": "pt"})
        save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        if reward_stats is not None:
            (tmp / STATS_FILE).write_text(json.dumps(reward_stats, indent=2) + "\n")
        if source_dir is not None:
            for name in COPIED_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copy2(Path(source_dir) / name, tmp / name)

    write_dir_atomically(Path(out_dir), write)
    return Path(out_dir)


def export_with_head(engine_or_module, out_dir, reward_stats: Optional[dict] = None,
                     source_dir=None) -> Optional[Path]:
    """Gather (all ranks) and write (rank 0) an export directory of a :class:`QwenWithHead`."""
    import torch.distributed as dist

    module = getattr(engine_or_module, "module", engine_or_module)
    state = full_state_dict(engine_or_module)
    path = None
    if state is not None:
        path = save_with_head(state, module.config, out_dir, reward_stats, source_dir)
    if dist.is_initialized():
        dist.barrier()
    return path
