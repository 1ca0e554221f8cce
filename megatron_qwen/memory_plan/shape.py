"""The shape of a Qwen decoder as the memory plan needs it, from whichever config names it.

Pretraining and SFT name the shape in the recipe (``model`` group, a preset); the reward model
and PPO load Hugging Face directories, whose ``config.json`` names it. A plan made before the
directory exists (the docs' tables, a laptop) takes a preset instead (``--model-preset``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from megatron_qwen.config import ConfigError, ModelConfig, load_model_config


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Sizes of one decoder; ``vocab`` is the embedding's row count (padded)."""

    layers: int
    hidden: int
    heads: int
    kv_groups: int
    ffn: int  # SwiGLU inner size (each of gate and up is hidden x ffn)
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self, tp: int = 1) -> int:
        """One decoder layer's parameters on one of ``tp`` tensor-parallel ranks."""
        d, a, g, h, f = self.head_dim, self.heads, self.kv_groups, self.hidden, self.ffn
        qkv = (a + 2 * g) * d
        split = h * qkv + qkv + a * d * h + 3 * h * f  # QKV (+ bias), proj, gate/up/down
        return split // tp + 2 * h  # the two norms are whole on every rank

    def small_params_per_layer(self) -> int:
        """Parameters of a layer that are 1-D (norms, QKV bias): DeepSpeed keeps small ones whole."""
        return 2 * self.hidden + (self.heads + 2 * self.kv_groups) * self.head_dim

    def embedding_params(self, tp: int = 1) -> int:
        return self.vocab * self.hidden // tp

    def total_params(self, heads_out: int = 0) -> int:
        """All parameters (TP=1); ``heads_out`` extra output rows of a scalar head (1) instead
        of the LM head (0 keeps the LM head unless the embeddings are tied)."""
        out = 0 if self.tied_embeddings else self.embedding_params()
        if heads_out:
            out = heads_out * self.hidden  # a bias-free scalar head (rlhf/heads.py)
        return self.layers * self.layer_params() + self.embedding_params() + self.hidden + out


def from_model_config(model: ModelConfig, tp: int = 1) -> ModelShape:
    return ModelShape(layers=model.num_layers, hidden=model.hidden_size,
                      heads=model.num_attention_heads,
                      kv_groups=model.num_query_groups or model.num_attention_heads,
                      ffn=model.ffn_hidden_size, vocab=model.vocab_size_padded(tp))


def from_preset(name: str) -> ModelShape:
    return from_model_config(load_model_config(name))


def from_hf_dir(path) -> ModelShape:
    """The shape in a Hugging Face qwen2 directory's ``config.json``."""
    file = Path(path) / "config.json"
    try:
        c = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot read the model shape ({exc})") from None
    try:
        return ModelShape(layers=int(c["num_hidden_layers"]), hidden=int(c["hidden_size"]),
                          heads=int(c["num_attention_heads"]),
                          kv_groups=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
                          ffn=int(c["intermediate_size"]), vocab=int(c["vocab_size"]),
                          tied_embeddings=bool(c.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise ConfigError(f"{file}: no {exc.args[0]} (not a qwen2 config)") from None


def hf_shape(path: Optional[str], preset: Optional[str], field: str) -> ModelShape:
    """The shape of an HF model directory, or of ``preset`` when given (or the directory is absent)."""
    if preset:
        return from_preset(preset)
    if path and (Path(path) / "config.json").is_file():
        return from_hf_dir(path)
    raise ConfigError(f"{field}={path}: no config.json there to read the model shape from "
                      f"(tools/plan_memory.py plans without it given --model-preset, e.g. qwen_7b)")
