"""Names and shapes of a Qwen checkpoint in each layout, and the tensor surgery between them.

Three layouts hold the same weights:

* ``qwen``  - the released ``QWenLMHeadModel`` (``transformer.h.N.attn.c_attn`` fused q|k|v,
  ``mlp.w1`` = up, ``mlp.w2`` = gate, ``mlp.c_proj`` = down);
* ``qwen2`` - transformers' native ``Qwen2ForCausalLM`` (separate q/k/v/o, gate/up/down);
* ``mcore`` - megatron-core's ``GPTModel`` (``linear_qkv`` fused per query group as
  [q heads of the group, k, v]; ``linear_fc1`` = [gate; up]).

Everything here works on *full* (unsharded) tensors with the real vocabulary row count; tensor
parallel slicing (:func:`tp_shard`) and vocabulary padding (:func:`pad_vocab`) are separate steps.
The model helper reuses :func:`hf_to_mcore_state_dict` in its parity tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from megatron_qwen.config import ConfigError, ModelConfig

HF_FORMATS = ("qwen", "qwen2")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or converted; the message is one line naming the file or
    tensor (a ConfigError, so every entry point prints it as one line)."""


# --------------------------------------------------------------------------- the shape of a model


@dataclass(frozen=True)
class Shape:
    """The dimensions every tensor shape below is derived from."""

    num_layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int  # SwiGLU inner size
    vocab_rows: int  # embedding rows as stored in the HF checkpoint (151,936 for Qwen)

    @classmethod
    def of(cls, cfg: ModelConfig, vocab_rows: int) -> "Shape":
        return cls(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads,
                   cfg.num_query_groups or cfg.num_attention_heads, cfg.kv_channels,
                   cfg.ffn_hidden_size, vocab_rows)


# --------------------------------------------------------------------------- configs


def detect_format(hf_config: Mapping, where: str = "config.json") -> str:
    """``qwen`` or ``qwen2`` from a config.json's model_type / architectures."""
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if model_type == "qwen" or "QWenLMHeadModel" in archs:
        return "qwen"
    if model_type == "qwen2" or "Qwen2ForCausalLM" in archs:
        return "qwen2"
    raise CheckpointError(f"{where}: model_type={model_type!r} architectures={archs}: "
                          "expected a Qwen (QWenLMHeadModel) or Qwen2ForCausalLM checkpoint")


def _need(hf_config: Mapping, key: str, where: str, kind: type = int):
    if key not in hf_config:
        raise CheckpointError(f"{where}: field {key!r} is missing")
    return _get(hf_config, key, None, where, kind)


def _get(hf_config: Mapping, key: str, default, where: str, kind: type = int):
    """``hf_config[key]`` (or ``default``) checked to be a JSON number of ``kind``: a string or a
    list where config.json must hold a number is a one-line error, not a TypeError later."""
    value = hf_config.get(key, default)
    if value is None:
        return default
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (numeric and float(value).is_integer()):
        raise CheckpointError(f"{where}: field {key!r} must be an integer, got {value!r}")
    if kind is float and not numeric:
        raise CheckpointError(f"{where}: field {key!r} must be a number, got {value!r}")
    return kind(value)


def model_config_from_hf(hf_config: Mapping, where: str = "config.json") -> Tuple[ModelConfig, int]:
    """The ModelConfig of an HF checkpoint, and its embedding row count."""
    fmt = detect_format(hf_config, where)
    g = lambda key: _need(hf_config, key, where)  # noqa: E731
    opt = lambda key, default, kind=int: _get(hf_config, key, default, where, kind)  # noqa: E731
    if hf_config.get("tie_word_embeddings", False):
        raise CheckpointError(f"{where}: tie_word_embeddings=true; Qwen's embedding and output "
                              "projection are separate tensors")
    if fmt == "qwen":
        heads, hidden = g("num_attention_heads"), g("hidden_size")
        if g("kv_channels") * heads != hidden:
            raise CheckpointError(f"{where}: kv_channels={hf_config['kv_channels']} x "
                                  f"num_attention_heads={heads} != hidden_size={hidden}")
        if opt("rotary_pct", 1.0, float) != 1.0:
            raise CheckpointError(f"{where}: rotary_pct={hf_config['rotary_pct']}: only 1.0 "
                                  "(rotary over the whole head) is supported")
        if g("intermediate_size") % 2:
            raise CheckpointError(f"{where}: intermediate_size={hf_config['intermediate_size']} "
                                  "is odd; Qwen's is 2 x the SwiGLU inner size")
        cfg = ModelConfig(
            num_layers=g("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=None, ffn_hidden_size=g("intermediate_size") // 2,
            vocab_size=g("vocab_size"), seq_length=opt("seq_length", 2048),
            max_position_embeddings=opt("max_position_embeddings", 8192),
            rotary_base=opt("rotary_emb_base", 10000.0, float),
            norm_epsilon=opt("layer_norm_epsilon", 1e-6, float),
            init_method_std=opt("initializer_range", 0.02, float),
            use_dynamic_ntk=bool(hf_config.get("use_dynamic_ntk", False)),
            use_logn_attn=bool(hf_config.get("use_logn_attn", False)),
        )
    else:
        heads = g("num_attention_heads")
        kv = opt("num_key_value_heads", None) or heads
        rope = hf_config.get("rope_parameters") or {}
        theta = _get(rope, "rope_theta", opt("rope_theta", 10000.0, float), where, float)
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"{where}: rope_type={rope['rope_type']!r}: only 'default' RoPE "
                                  "is supported")
        if hf_config.get("use_sliding_window"):
            raise CheckpointError(f"{where}: use_sliding_window=true is not supported")
        head_dim = opt("head_dim", None)
        if head_dim is not None and head_dim * heads != g("hidden_size"):
            raise CheckpointError(f"{where}: head_dim={head_dim} x num_attention_heads={heads} "
                                  f"!= hidden_size={hf_config['hidden_size']}")
        cfg = ModelConfig(
            num_layers=g("num_hidden_layers"), hidden_size=g("hidden_size"),
            num_attention_heads=heads, num_query_groups=None if kv == heads else kv,
            ffn_hidden_size=g("intermediate_size"), vocab_size=g("vocab_size"),
            # Qwen2's config has one length, the context it was trained for (exported below
            # from seq_length); the longest the model saw is what NTK and LogN pivot on.
            seq_length=opt("max_position_embeddings", 2048),
            max_position_embeddings=opt("max_position_embeddings", 2048),
            rotary_base=float(theta), norm_epsilon=opt("rms_norm_eps", 1e-6, float),
            init_method_std=opt("initializer_range", 0.02, float),
        )
    try:
        cfg.validate()
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return cfg, int(hf_config["vocab_size"])


def hf_config_from_model(cfg: ModelConfig, fmt: str, vocab_rows: int, dtype: torch.dtype,
                         eos_token_id: int = 151643, original: Optional[Mapping] = None) -> dict:
    """config.json for an exported checkpoint.

    For ``qwen`` the original config (kept in the mcore metadata) is reused with the shape fields
    refreshed, so fields such as ``use_flash_attn`` or ``auto_map`` survive the round trip.
    """
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16",
                  torch.float32: "float32"}[dtype]
    if fmt == "qwen":
        keep = (original or {}).get("model_type") == "qwen"
        out = dict(original) if keep else {
            "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "no_bias": True,
            "rotary_pct": 1.0, "scale_attn_weights": True, "attn_dropout_prob": 0.0,
            "emb_dropout_prob": 0.0, "tokenizer_class": "QWenTokenizer", "use_cache": True,
            "use_flash_attn": "auto",
            "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        }
        if cfg.num_query_groups not in (None, cfg.num_attention_heads):
            raise CheckpointError(f"num_query_groups={cfg.num_query_groups}: the qwen layout has "
                                  "no grouped-query attention; export with --hf-format qwen2")
        out.update(
            hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
            num_hidden_layers=cfg.num_layers, kv_channels=cfg.kv_channels,
            intermediate_size=2 * cfg.ffn_hidden_size, vocab_size=vocab_rows,
            seq_length=cfg.seq_length, max_position_embeddings=cfg.max_position_embeddings,
            rotary_emb_base=cfg.rotary_base, layer_norm_epsilon=cfg.norm_epsilon,
            initializer_range=cfg.init_method_std, use_dynamic_ntk=cfg.use_dynamic_ntk,
            use_logn_attn=cfg.use_logn_attn, tie_word_embeddings=False,
        )
        if not keep:  # the released configs leave these false (auto); ours name the dtype
            out.update(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                       fp32=dtype == torch.float32)
        return out
    from transformers import Qwen2Config

    hf = Qwen2Config(
        vocab_size=vocab_rows, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads,
        max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_epsilon,
        initializer_range=cfg.init_method_std, tie_word_embeddings=False,
        rope_theta=cfg.rotary_base, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        architectures=["Qwen2ForCausalLM"],
    )
    out = hf.to_diff_dict()  # what save_pretrained writes: the fields that differ from defaults
    out["torch_dtype"] = out["dtype"] = dtype_name
    return out


# --------------------------------------------------------------------------- tensor names


def mcore_name(role: str, layer: Optional[int] = None) -> str:
    """The megatron-core GPTModel parameter name of a role (full model, global layer index)."""
    if layer is None:
        return {"embedding": "embedding.word_embeddings.weight",
                "final_norm": "decoder.final_layernorm.weight",
                "output": "output_layer.weight"}[role]
    return f"decoder.layers.{layer}." + {
        "input_norm": "input_layernorm.weight",
        "qkv_weight": "self_attention.linear_qkv.weight",
        "qkv_bias": "self_attention.linear_qkv.bias",
        "proj": "self_attention.linear_proj.weight",
        "post_norm": "pre_mlp_layernorm.weight",
        "fc1": "mlp.linear_fc1.weight",
        "fc2": "mlp.linear_fc2.weight",
    }[role]


GLOBAL_ROLES = ("embedding", "final_norm", "output")
LAYER_ROLES = ("input_norm", "qkv_weight", "qkv_bias", "proj", "post_norm", "fc1", "fc2")


def hf_names(fmt: str, layer: Optional[int] = None) -> Dict[str, str]:
    """HF tensor names of one layer (or of the global tensors when ``layer`` is None)."""
    if fmt == "qwen":
        if layer is None:
            return {"embedding": "transformer.wte.weight", "final_norm": "transformer.ln_f.weight",
                    "output": "lm_head.weight"}
        p = f"transformer.h.{layer}."
        return {"input_norm": p + "ln_1.weight", "c_attn_weight": p + "attn.c_attn.weight",
                "c_attn_bias": p + "attn.c_attn.bias", "proj": p + "attn.c_proj.weight",
                "post_norm": p + "ln_2.weight", "up": p + "mlp.w1.weight",
                "gate": p + "mlp.w2.weight", "fc2": p + "mlp.c_proj.weight"}
    if fmt != "qwen2":
        raise CheckpointError(f"unknown HF format {fmt!r}; choose one of {', '.join(HF_FORMATS)}")
    if layer is None:
        return {"embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                "output": "lm_head.weight"}
    p = f"model.layers.{layer}."
    return {"input_norm": p + "input_layernorm.weight",
            "q_weight": p + "self_attn.q_proj.weight", "q_bias": p + "self_attn.q_proj.bias",
            "k_weight": p + "self_attn.k_proj.weight", "k_bias": p + "self_attn.k_proj.bias",
            "v_weight": p + "self_attn.v_proj.weight", "v_bias": p + "self_attn.v_proj.bias",
            "proj": p + "self_attn.o_proj.weight", "post_norm": p + "post_attention_layernorm.weight",
            "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight",
            "fc2": p + "mlp.down_proj.weight"}


def hf_shapes(fmt: str, s: Shape, layer: Optional[int] = None) -> Dict[str, Tuple[int, ...]]:
    """Expected shape of every tensor in :func:`hf_names` (same keys)."""
    h, q, kv = s.hidden, s.heads * s.head_dim, s.groups * s.head_dim
    if layer is None:
        return {"embedding": (s.vocab_rows, h), "final_norm": (h,), "output": (s.vocab_rows, h)}
    common = {"input_norm": (h,), "proj": (h, q), "post_norm": (h,), "gate": (s.ffn, h),
              "up": (s.ffn, h), "fc2": (h, s.ffn)}
    if fmt == "qwen":
        return {**common, "c_attn_weight": (q + 2 * kv, h), "c_attn_bias": (q + 2 * kv,)}
    return {**common, "q_weight": (q, h), "q_bias": (q,), "k_weight": (kv, h), "k_bias": (kv,),
            "v_weight": (kv, h), "v_bias": (kv,)}


def mcore_shapes(s: Shape, layer: Optional[int] = None,
                 vocab_rows: Optional[int] = None) -> Dict[str, Tuple[int, ...]]:
    """Full (TP=1) shapes of the megatron-core tensors, keyed by role."""
    h, q, kv = s.hidden, s.heads * s.head_dim, s.groups * s.head_dim
    if layer is None:
        rows = vocab_rows or s.vocab_rows
        return {"embedding": (rows, h), "final_norm": (h,), "output": (rows, h)}
    return {"input_norm": (h,), "qkv_weight": (q + 2 * kv, h), "qkv_bias": (q + 2 * kv,),
            "proj": (h, q), "post_norm": (h,), "fc1": (2 * s.ffn, h), "fc2": (h, s.ffn)}


# --------------------------------------------------------------------------- tensor surgery


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shape) -> torch.Tensor:
    """HF q/k/v (weights or biases) -> megatron-core's per-group [q..., k, v] layout."""
    rest = q.shape[1:]
    per = s.heads // s.groups
    return torch.cat([q.reshape(s.groups, per * s.head_dim, *rest),
                      k.reshape(s.groups, s.head_dim, *rest),
                      v.reshape(s.groups, s.head_dim, *rest)], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, s: Shape) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    rest = qkv.shape[1:]
    per = s.heads // s.groups
    grouped = qkv.reshape(s.groups, (per + 2) * s.head_dim, *rest)
    q, k, v = torch.split(grouped, [per * s.head_dim, s.head_dim, s.head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad (with zeros) or trim the vocabulary rows of an embedding / output matrix."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        return t[:rows].clone()  # a copy: a view would drag the padded storage along when saved
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _checked(get: Callable[[str], torch.Tensor], name: str, shape: Tuple[int, ...]) -> torch.Tensor:
    t = get(name)
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                              "from config.json")
    return t


def hf_to_mcore(fmt: str, get: Callable[[str], torch.Tensor], s: Shape,
                layer: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """One layer (or the global tensors) of an HF checkpoint as megatron-core roles.

    ``get(name)`` returns an HF tensor (raising :class:`CheckpointError` if missing); every shape
    is checked against ``s``. The vocabulary is not padded here.
    """
    names, shapes = hf_names(fmt, layer), hf_shapes(fmt, s, layer)
    t = {role: _checked(get, names[role], shapes[role]) for role in names}
    if layer is None:
        return t
    if fmt == "qwen":  # c_attn is [all q; all k; all v]
        q, k, v = torch.split(t["c_attn_weight"], [s.heads * s.head_dim, s.groups * s.head_dim,
                                                   s.groups * s.head_dim])
        qb, kb, vb = torch.split(t["c_attn_bias"], [s.heads * s.head_dim, s.groups * s.head_dim,
                                                    s.groups * s.head_dim])
    else:
        q, k, v = t["q_weight"], t["k_weight"], t["v_weight"]
        qb, kb, vb = t["q_bias"], t["k_bias"], t["v_bias"]
    return {"input_norm": t["input_norm"], "qkv_weight": fuse_qkv(q, k, v, s),
            "qkv_bias": fuse_qkv(qb, kb, vb, s), "proj": t["proj"], "post_norm": t["post_norm"],
            "fc1": torch.cat([t["gate"], t["up"]]), "fc2": t["fc2"]}


def mcore_to_hf(fmt: str, t: Mapping[str, torch.Tensor], s: Shape,
                layer: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_mcore`: megatron-core roles -> HF names (vocabulary un-padded)."""
    names = hf_names(fmt, layer)
    if layer is None:  # any subset of the global roles (the exporter loads them one by one)
        return {names[role]: tensor if role == "final_norm" else pad_vocab(tensor, s.vocab_rows)
                for role, tensor in t.items()}
    q, k, v = split_qkv(t["qkv_weight"], s)
    qb, kb, vb = split_qkv(t["qkv_bias"], s)
    gate, up = (x.contiguous() for x in torch.chunk(t["fc1"], 2))
    out = {"input_norm": t["input_norm"], "proj": t["proj"], "post_norm": t["post_norm"],
           "gate": gate, "up": up, "fc2": t["fc2"]}
    if fmt == "qwen":
        out["c_attn_weight"] = torch.cat([q, k, v])
        out["c_attn_bias"] = torch.cat([qb, kb, vb])
    else:
        out.update(q_weight=q, k_weight=k, v_weight=v, q_bias=qb, k_bias=kb, v_bias=vb)
    return {names[role]: tensor for role, tensor in out.items()}


# --------------------------------------------------------------------------- whole state dicts


def hf_to_mcore_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                           fmt: str = "qwen2", padded_vocab: Optional[int] = None
                           ) -> Dict[str, torch.Tensor]:
    """A full HF state dict -> the full (TP=1, PP=1) megatron-core GPTModel state dict.

    ``padded_vocab`` pads the embedding/output rows (e.g. ``cfg.vocab_size_padded(tp)``).
    """
    def get(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise CheckpointError(f"tensor {name} is missing from the HF state dict")
        return hf_state[name]

    s = Shape.of(cfg, get(hf_names(fmt)["embedding"]).shape[0])
    out: Dict[str, torch.Tensor] = {}
    for layer in [None, *range(cfg.num_layers)]:
        for role, tensor in hf_to_mcore(fmt, get, s, layer).items():
            if role in ("embedding", "output") and padded_vocab:
                tensor = pad_vocab(tensor, padded_vocab)
            out[mcore_name(role, layer)] = tensor
    return out


def mcore_to_hf_state_dict(mcore_state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                           vocab_rows: int, fmt: str = "qwen2") -> Dict[str, torch.Tensor]:
    """A full megatron-core state dict -> HF names, the vocabulary cut back to ``vocab_rows``."""
    s = Shape.of(cfg, vocab_rows)
    out: Dict[str, torch.Tensor] = {}
    for layer in [None, *range(cfg.num_layers)]:
        roles = GLOBAL_ROLES if layer is None else LAYER_ROLES
        try:
            t = {role: mcore_state[mcore_name(role, layer)] for role in roles}
        except KeyError as exc:
            raise CheckpointError(f"tensor {exc.args[0]} is missing from the mcore state dict") from None
        out.update(mcore_to_hf(fmt, t, s, layer))
    return out


# --------------------------------------------------------------------------- model parallel slices


_COLUMN = ("embedding.word_embeddings.weight", "output_layer.weight",
           "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def tp_shard(name: str, tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of a full megatron-core parameter.

    Column-parallel weights split their rows (linear_qkv's per-group layout makes each rank's
    slice whole query groups); fc1 splits gate and up separately so each rank holds
    [gate_r; up_r]; row-parallel weights split their columns; norms are replicated.
    """
    if tp_size == 1:
        return tensor
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = torch.chunk(tensor, 2)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
    if name.endswith(_COLUMN):
        return tensor.chunk(tp_size, dim=0)[tp_rank].contiguous()
    if name.endswith(_ROW):
        return tensor.chunk(tp_size, dim=1)[tp_rank].contiguous()
    return tensor


def layers_of_chunk(num_layers: int, pp_size: int, pp_rank: int, vpp_size: Optional[int] = None,
                    vp_stage: int = 0) -> range:
    """Global layer indices held by one (virtual) pipeline chunk, megatron-core's even split."""
    chunks = pp_size * (vpp_size or 1)
    per = num_layers // chunks
    start = (vp_stage * pp_size + pp_rank) * per
    return range(start, start + per)


def local_state_dict(full: Mapping[str, torch.Tensor], num_layers: int, tp_rank: int = 0,
                     tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1,
                     vpp_size: Optional[int] = None, vp_stage: int = 0) -> Dict[str, torch.Tensor]:
    """The ``load_state_dict`` input of one model chunk, from a full megatron-core state dict.

    Layers are renumbered to the chunk's local indices; the embedding goes to the first chunk
    and the final norm / output layer to the last, as megatron-core places them.
    """
    layers = layers_of_chunk(num_layers, pp_size, pp_rank, vpp_size, vp_stage)
    first = layers.start == 0
    last = layers.stop == num_layers
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        if name.startswith("decoder.layers."):
            idx, rest = name[len("decoder.layers."):].split(".", 1)
            if int(idx) not in layers:
                continue
            name = f"decoder.layers.{int(idx) - layers.start}.{rest}"
        elif name.startswith("embedding.") and not first:
            continue
        elif name.startswith(("decoder.final_layernorm", "output_layer.")) and not last:
            continue
        out[name] = tp_shard(name, tensor, tp_rank, tp_size)
    return out
