"""One configuration system for every entry point.

A config is a dataclass whose fields are *groups* (themselves dataclasses: model, parallel,
optim, ...). Values come, lowest precedence first, from: the dataclass defaults, the model preset
(``model.preset``, wherever it is named), a YAML recipe (``--config recipe.yaml``), the command
line. A recipe value is typed as the same text on the command line would be (``"1e-3"`` is 0.001,
``"no"`` is false, ``2.7`` for an integer field is an error). Every field is settable on the
command line two ways: ``--group.field value`` (torchtitan style) and ``--field-name value`` (the Megatron-LM
spelling users already script against, e.g. ``--tensor-model-parallel-size 2``). Field names are
therefore unique across the groups of one config.

Each group validates itself in ``validate()`` and raises :class:`ConfigError` with a one-line
reason; cross-group checks go in the top-level config's ``validate()``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

PACKAGE_CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the field."""


# --------------------------------------------------------------------------- model group


@dataclasses.dataclass
class ModelConfig:
    """Shape and numerics of a Qwen decoder (report section 2.3)."""

    preset: Optional[str] = None  # name of a YAML in configs/model/, applied before the fields
    num_layers: int = 2  # transformer layers
    hidden_size: int = 64  # model width
    num_attention_heads: int = 4  # query heads
    num_query_groups: Optional[int] = None  # None: multi-head attention (Qwen-1)
    ffn_hidden_size: int = 172  # SwiGLU inner size (HF Qwen's intermediate_size / 2)
    vocab_size: int = 151851  # tokenizer size; the embedding is padded (see padded_vocab_size)
    make_vocab_size_divisible_by: int = 128  # the embedding rows are a multiple of this x TP
    padded_vocab_size: Optional[int] = None  # fixed by a converted checkpoint; else derived from TP
    seq_length: int = 2048  # training context
    max_position_embeddings: int = 8192  # longest context the model is built for (at inference)
    rotary_base: float = 10000.0  # RoPE base (theta)
    norm_epsilon: float = 1e-6  # RMSNorm epsilon
    init_method_std: float = 0.02  # std of the normal weight initialisation
    hidden_dropout: float = 0.0  # dropout after attention and MLP
    attention_dropout: float = 0.0  # dropout on the attention probabilities
    attention_backend: str = "sdpa"  # sdpa | flash | unfused
    # Long context at inference (report section 2.5); all off for training.
    use_dynamic_ntk: bool = False  # inference: NTK-aware RoPE base past seq_length (report 2.5)
    use_logn_attn: bool = False  # inference: LogN query scaling past seq_length (report 2.5)
    window_sizes: Optional[list] = None  # one int (or None = full) per layer
    # Activation recomputation: None | selective | full
    recompute_granularity: Optional[str] = None  # recompute activations: selective (attention) | full (layers)
    recompute_num_layers: int = 1  # with full: layers per recomputed block
    # Layer implementation (Megatron-LM's flag; model/layer_spec.py decides, docs/model.md)
    transformer_impl: Optional[str] = None  # transformer_engine | local; unset: TE when importable on a GPU, else local
    fp8_format: Optional[str] = None  # FP8 GEMMs (Transformer Engine only): hybrid (E4M3 fwd, E5M2 grads) | e4m3

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "vocab_size", "make_vocab_size_divisible_by", "seq_length",
                     "max_position_embeddings", "recompute_num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")
        for name in ("num_query_groups", "padded_vocab_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1 (or null)")
        for name in ("rotary_base", "norm_epsilon", "init_method_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be > 0")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be in [0, 1)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={groups}"
            )
        if self.attention_backend not in ("sdpa", "flash", "unfused"):
            raise ConfigError(
                f"model.attention_backend={self.attention_backend!r}: choose sdpa, flash or unfused"
            )
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ConfigError(
                f"model.recompute_granularity={self.recompute_granularity!r}: choose selective or full"
            )
        if self.transformer_impl not in (None, "transformer_engine", "local"):
            raise ConfigError(f"model.transformer_impl={self.transformer_impl!r}: choose "
                              "transformer_engine or local (or leave it unset: automatic)")
        if self.fp8_format not in (None, "hybrid", "e4m3"):
            raise ConfigError(f"model.fp8_format={self.fp8_format!r}: choose hybrid or e4m3")
        if self.window_sizes is not None and len(self.window_sizes) != self.num_layers:
            raise ConfigError(
                f"model.window_sizes has {len(self.window_sizes)} entries for "
                f"{self.num_layers} layers"
            )
        for w in self.window_sizes or []:
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                raise ConfigError(f"model.window_sizes: {w!r} is not a window (an integer >= 1, or null)")

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def vocab_size_padded(self, tensor_model_parallel_size: int = 1) -> int:
        """Megatron's padding: a multiple of make_vocab_size_divisible_by x TP."""
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple


@dataclasses.dataclass
class ParallelConfig:
    """How the model is laid out over GPUs (or gloo processes on CPU)."""

    tensor_model_parallel_size: int = 1  # TP: each layer's matrices split over this many ranks
    pipeline_model_parallel_size: int = 1  # PP: the layers split into this many stages
    virtual_pipeline_model_parallel_size: Optional[int] = None  # interleaved 1F1B: chunks per pipeline rank
    sequence_parallel: bool = False  # split norms/dropout activations along the sequence over the TP ranks
    use_distributed_optimizer: bool = False  # shard optimizer state over the data-parallel ranks (ZeRO-1)
    overlap_grad_reduce: bool = False  # overlap the gradient all-reduce with the backward pass
    overlap_param_gather: bool = False  # overlap the param all-gather with the forward
    context_parallel_size: int = 1  # CP: each sequence split over this many ranks (Transformer Engine attention only)
    tp_comm_overlap: bool = False  # overlap TP communication with the GEMMs (Transformer Engine; TP > 1 with sequence_parallel)

    def validate(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp < 1:
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size must be >= 1 (or null)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
        if vpp is not None and vpp > 1 and self.pipeline_model_parallel_size < 2:
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1"
            )
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather needs use_distributed_optimizer")
        if self.tp_comm_overlap and not (self.tensor_model_parallel_size > 1 and self.sequence_parallel):
            raise ConfigError("parallel.tp_comm_overlap needs tensor_model_parallel_size > 1 with "
                              "sequence_parallel (it overlaps sequence-parallel all-gathers and "
                              "reduce-scatters with the GEMMs)")

    def check_model(self, model: ModelConfig) -> None:
        """The layout checks that need the model's shape."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        groups = model.num_query_groups or model.num_attention_heads
        if model.num_attention_heads % tp or groups % tp:
            raise ConfigError(
                f"tensor_model_parallel_size={tp} does not divide the {model.num_attention_heads} "
                f"attention heads / {groups} query groups"
            )
        if model.ffn_hidden_size % tp:
            raise ConfigError(
                f"tensor_model_parallel_size={tp} does not divide ffn_hidden_size={model.ffn_hidden_size}"
            )
        chunks = pp * (self.virtual_pipeline_model_parallel_size or 1)
        if model.num_layers % chunks:
            raise ConfigError(
                f"pipeline_model_parallel_size={pp} x virtual={self.virtual_pipeline_model_parallel_size or 1} "
                f"does not divide num_layers={model.num_layers}"
            )
        cp = self.context_parallel_size
        if cp > 1 and model.seq_length % (2 * cp):
            raise ConfigError(f"context_parallel_size={cp}: model.seq_length={model.seq_length} must be "
                              f"a multiple of 2 x {cp} (each rank takes two load-balanced chunks)")
        if model.padded_vocab_size is not None and model.padded_vocab_size % tp:
            raise ConfigError(
                f"tensor_model_parallel_size={tp} does not divide padded_vocab_size={model.padded_vocab_size}"
            )


# --------------------------------------------------------------------------- machinery


def model_preset(name: str) -> dict:
    """Fields of a model preset shipped in configs/model/<name>.yaml."""
    path = PACKAGE_CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (PACKAGE_CONFIG_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"model.preset={name!r} is unknown; known presets: {', '.join(known)}")
    return yaml.safe_load(path.read_text()) or {}


def load_model_config(preset: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a preset name, with field overrides (used by tests and tools)."""
    cfg = _build_group(ModelConfig, {"preset": preset, **overrides}, "model")
    cfg.validate()
    return cfg


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _resolved_hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _scalar_type(hint: Any) -> Any:
    """The type used to parse a CLI string for a field annotated ``hint``."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else str
    if origin in (list, tuple) or hint in (list, tuple):
        return list
    if hint in (int, float, str, bool):
        return hint
    if hint is dict or origin is dict:
        return dict
    return str


def _parse_value(text: str, hint: Any, flag: str) -> Any:
    kind = _scalar_type(hint)
    if text.lower() in ("none", "null") and typing.get_origin(hint) is typing.Union:
        return None
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind in (list, dict):
            return yaml.safe_load(text)
        return kind(text)
    except (ValueError, yaml.YAMLError):
        raise ConfigError(f"{flag}: cannot read {text!r} as {getattr(kind, '__name__', kind)}") from None


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def typed_value(value: Any, hint: Any, where: str) -> Any:
    """A value from a recipe (YAML) or a preset as the field annotated ``hint`` holds it, typed
    as the command line types the same text; a wrong type is a ConfigError naming ``where``.
    Already-typed values (the command line's) pass unchanged."""
    kind = _scalar_type(hint)
    name = getattr(kind, "__name__", str(kind))
    if value is None:
        if _is_optional(hint):
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {name})")
    if kind is list:
        if isinstance(value, str):  # as --flag '[a, b]' on the command line
            value = _parse_value(value, hint, where)
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}: expected a list, got {value!r} (write [{value}])")
    if kind is dict:
        if isinstance(value, str):
            value = _parse_value(value, hint, where)
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")
    if kind is str:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r} (quote it)")
        # as on the command line: "none" / "null" is None where the field is optional
        return _parse_value(value if isinstance(value, str) else str(value), hint, where)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    # a string, or a scalar of another type: read its text as the command line would
    # ("1e-3" -> 0.001, "no" -> False, 2.7 for an int -> error)
    return _parse_value(value if isinstance(value, str) else str(value), hint, where)


def _typed_group(cls: type, values: dict, group_name: str, source: str = "") -> dict:
    """``values`` (one group of a recipe) with unknown fields refused and every value typed."""
    prefix = f"{source}: " if source else ""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}group {group_name!r} must be a mapping of field: value, "
                          f"got {type(values).__name__}")
    hints = _resolved_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"{prefix}unknown field(s) in group {group_name!r}: {', '.join(map(str, unknown))}")
    return {k: typed_value(v, hints[k], f"{prefix}{group_name}.{k}") for k, v in values.items()}


def _build_group(cls: type, values: dict, group_name: str, source: str = "") -> Any:
    """One group from its values; a ModelConfig's preset fills the fields not given."""
    values = _typed_group(cls, dict(values or {}), group_name, source)
    if cls is ModelConfig and values.get("preset"):
        name = values["preset"]
        values = {**_typed_group(cls, model_preset(name), group_name, f"model.preset={name}"),
                  **values}
    return cls(**values)


def _flag_index(cls: type) -> dict:
    """Map every accepted flag to (group, field, type hint)."""
    index: dict = {}
    for group in dataclasses.fields(cls):
        gcls = _resolved_hints(cls)[group.name]
        if not _is_dataclass_type(gcls):
            continue
        hints = _resolved_hints(gcls)
        for f in dataclasses.fields(gcls):
            entry = (group.name, f.name, hints[f.name])
            index[f"--{group.name}.{f.name}"] = entry
            index[f"--{group.name}.{f.name.replace('_', '-')}"] = entry
            plain = f"--{f.name.replace('_', '-')}"
            if plain in index and index[plain][:2] != entry[:2]:
                raise TypeError(f"field {f.name!r} appears in two groups of {cls.__name__}")
            index[plain] = entry
            for alias in f.metadata.get("aliases", ()):
                index[alias] = entry
    return index


def parse_overrides(cls: type, argv: Sequence[str]) -> dict:
    """Turn ``--flag value`` pairs (and bare ``--flag`` for booleans) into {group: {field: v}}."""
    index = _flag_index(cls)
    out: dict = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: settings are --flag value")
        flag, eq, inline = token.partition("=")
        negate = False
        if flag not in index and flag.startswith("--no-") and f"--{flag[5:]}" in index:
            flag, negate = f"--{flag[5:]}", True
        if flag not in index:
            close = [k for k in index if k.startswith(flag[:6])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown setting {flag}{hint}")
        group, field, hint_t = index[flag]
        kind = _scalar_type(hint_t)
        if eq:
            value = _parse_value(inline, hint_t, flag)
            i += 1
        elif kind is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            value = not negate
            i += 1
        elif kind is list and group == "data" and field == "data_path":
            # Megatron's blend form: --data-path 0.7 web 0.3 code (values until the next flag)
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            value = argv[i + 1 : j]
            i = j
        else:
            if i + 1 == len(argv):
                raise ConfigError(f"{flag} needs a value")
            value = _parse_value(argv[i + 1], hint_t, flag)
            i += 2
        out.setdefault(group, {})[field] = value
    return out


def build_config(cls: type, recipe: Optional[dict] = None, overrides: Optional[dict] = None,
                 source: str = "recipe") -> Any:
    """Instantiate a top-level config from a recipe mapping and CLI overrides, then validate.

    Precedence, lowest first: defaults < the model preset < the recipe < the overrides. The
    preset is the one finally named (an override's ``--model.preset`` replaces the recipe's),
    and it only fills fields that neither the recipe nor an override sets. ``source`` names the
    recipe in errors (its file name)."""
    recipe = recipe or {}
    overrides = overrides or {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"{source}: expected a mapping of groups, got {type(recipe).__name__}")
    hints = _resolved_hints(cls)
    unknown = sorted(set(recipe) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{source}: unknown group(s) in recipe: {', '.join(map(str, unknown))}")
    kwargs = {}
    for group in dataclasses.fields(cls):
        gcls = hints[group.name]
        if not _is_dataclass_type(gcls):
            continue
        from_recipe = _typed_group(gcls, recipe.get(group.name) or {}, group.name, source)
        merged = {**from_recipe, **overrides.get(group.name, {})}
        kwargs[group.name] = _build_group(gcls, merged, group.name)
    cfg = cls(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    for group in dataclasses.fields(cfg):
        value = getattr(cfg, group.name)
        if hasattr(value, "validate"):
            value.validate()
    if hasattr(cfg, "validate"):
        cfg.validate()


def load_config(cls: type, argv: Optional[Sequence[str]] = None, description: str = "") -> Any:
    """Parse ``[--config recipe.yaml] [--flag value ...]`` into a validated ``cls``.

    Errors are printed as one line and exit with status 2, like argparse.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, description))
        raise SystemExit(0)
    recipe: dict = {}
    path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 == len(argv):
            raise SystemExit("error: --config needs a YAML file")
        path = Path(argv[i + 1])
        if not path.is_file():
            raise SystemExit(f"error: --config {path}: no such file")
        try:
            recipe = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SystemExit(f"error: --config {path}: not valid YAML ({str(exc).splitlines()[0]})")
        argv = argv[:i] + argv[i + 2 :]
    try:
        return build_config(cls, recipe, parse_overrides(cls, argv), source=str(path) if recipe else "recipe")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}")


def field_help(cls: type) -> dict:
    """{field: one-line description} of a dataclass: its ``metadata["help"]``, else the comment
    on the field's own line(s) in the source (``lr: float = 3e-4  # peak learning rate``), so the
    comment a reader sees beside a field is what ``--help`` prints."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    out = {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if f.metadata.get("help")}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (an interactive class): metadata only
        return out
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], tok.string.lstrip("#").strip())
    (body,) = ast.parse(source).body
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = next((comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments), "")
            if text:
                out.setdefault(node.target.id, text)
    return out


def help_text(cls: type, description: str = "") -> str:
    hints = _resolved_hints(cls)
    lines = [description or (cls.__doc__ or "").strip(), "", "usage: [--config RECIPE.yaml] [--flag VALUE ...]", ""]
    for group in dataclasses.fields(cls):
        gcls = hints[group.name]
        if not _is_dataclass_type(gcls):
            continue
        lines.append(f"{group.name}:")
        ghints = _resolved_hints(gcls)
        helps = field_help(gcls)
        for f in dataclasses.fields(gcls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            kind = getattr(_scalar_type(ghints[f.name]), "__name__", "str")
            help_ = helps.get(f.name, "")
            if f.metadata.get("aliases"):
                help_ += f" (also {', '.join(f.metadata['aliases'])})"
            lines.append(f"  --{f.name.replace('_', '-'):40s} {kind:6s} default: {default!r}"
                         + (f"\n      {help_}" if help_ else ""))
        lines.append("")
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML (it is saved beside every checkpoint)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, default=str)
