"""Settings and entry point of ``tools/convert_checkpoint.py`` (three subcommands).

Each subcommand is a config group read by the project's one config loader, so every flag can
also come from a YAML recipe (``--config``) and ``--tp``/``--pp``/``--vpp`` have their Megatron
spellings (``--tensor-model-parallel-size`` ...) as aliases.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Optional, Sequence

from megatron_qwen.checkpoint.mapping import HF_FORMATS, CheckpointError
from megatron_qwen.config import ConfigError, load_config

USAGE = """usage: convert_checkpoint.py SUBCOMMAND [--flag value ...]

  hf-to-mcore --hf DIR --out DIR --tp N --pp N [--vpp N] [--dtype bf16|fp16|fp32]
  mcore-to-hf --mcore DIR --out DIR [--hf-format qwen2|qwen] [--tokenizer auto|none|PATH]
              [--vocab-size N] [--max-shard-size-gb G]
  reshard     --mcore DIR --out DIR --tp N --pp N [--vpp N]

`convert_checkpoint.py SUBCOMMAND --help` lists every setting; docs/checkpoints.md explains them."""


def _layout(default: Optional[int], megatron_flag: str, doc: str):
    return dataclasses.field(default=default, metadata={"aliases": (megatron_flag,), "help": doc})


def _require(group: str, **values) -> None:
    for name, value in values.items():
        if value in (None, ""):
            raise ConfigError(f"{group}: --{name.replace('_', '-')} is required")


@dataclasses.dataclass
class HfToMcore:
    """An HF checkpoint (Qwen's QWenLMHeadModel or transformers' Qwen2ForCausalLM layout)."""

    hf: Optional[str] = None  # source directory: config.json + safetensors / .bin shards
    out: Optional[str] = None  # new directory for the torch_dist checkpoint
    tp: int = _layout(1, "--tensor-model-parallel-size", "TP the vocabulary is padded for")
    pp: int = _layout(1, "--pipeline-model-parallel-size", "PP recorded (checked against layers)")
    vpp: Optional[int] = _layout(None, "--virtual-pipeline-model-parallel-size", "virtual stages")
    dtype: Optional[str] = None  # bf16 | fp16 | fp32; default: keep the source's

    def validate(self) -> None:
        _require("hf-to-mcore", hf=self.hf, out=self.out)
        if self.dtype not in (None, "bf16", "fp16", "fp32"):
            raise ConfigError(f"hf-to-mcore: --dtype {self.dtype!r}: choose bf16, fp16 or fp32")


@dataclasses.dataclass
class McoreToHf:
    """A megatron-core torch_dist checkpoint -> HF safetensors, config, tokenizer."""

    mcore: Optional[str] = None  # DIR with latest_checkpointed_iteration.txt, or DIR/iter_NNNNNNN
    out: Optional[str] = None  # new directory for the HF checkpoint
    hf_format: str = "qwen2"  # qwen2 (Qwen2ForCausalLM, no remote code) | qwen (QWenLMHeadModel)
    tokenizer: str = "auto"  # auto | none | a .tiktoken file or a directory holding qwen.tiktoken
    vocab_size: Optional[int] = None  # exported embedding rows; default: the source HF row count
    max_shard_size_gb: float = 2.0  # safetensors serialises a shard in memory: ~2x this

    def validate(self) -> None:
        _require("mcore-to-hf", mcore=self.mcore, out=self.out)
        if self.hf_format not in HF_FORMATS:
            raise ConfigError(f"mcore-to-hf: --hf-format {self.hf_format!r}: choose "
                              f"{' or '.join(HF_FORMATS)}")
        if self.max_shard_size_gb <= 0:
            raise ConfigError("mcore-to-hf: --max-shard-size-gb must be > 0")


@dataclasses.dataclass
class Reshard:
    """A torch_dist checkpoint -> the same weights laid out (vocabulary padded) for another TP/PP."""

    mcore: Optional[str] = None  # source torch_dist checkpoint directory
    out: Optional[str] = None  # new directory for the resharded checkpoint
    tp: int = _layout(1, "--tensor-model-parallel-size", "target TP")
    pp: int = _layout(1, "--pipeline-model-parallel-size", "target PP")
    vpp: Optional[int] = _layout(None, "--virtual-pipeline-model-parallel-size", "virtual stages")

    def validate(self) -> None:
        _require("reshard", mcore=self.mcore, out=self.out)


@dataclasses.dataclass
class HfToMcoreConfig:
    convert: HfToMcore = dataclasses.field(default_factory=HfToMcore)


@dataclasses.dataclass
class McoreToHfConfig:
    convert: McoreToHf = dataclasses.field(default_factory=McoreToHf)


@dataclasses.dataclass
class ReshardConfig:
    convert: Reshard = dataclasses.field(default_factory=Reshard)


SUBCOMMANDS = {"hf-to-mcore": HfToMcoreConfig, "mcore-to-hf": McoreToHfConfig,
               "reshard": ReshardConfig}


def run(subcommand: str, cfg) -> None:
    from megatron_qwen.checkpoint import convert

    c = cfg.convert
    if subcommand == "hf-to-mcore":
        model = convert.hf_to_mcore_checkpoint(c.hf, c.out, c.tp, c.pp, c.vpp, c.dtype)
        print(f"wrote {c.out}: {model.num_layers} layers, vocabulary padded to "
              f"{model.padded_vocab_size} rows for TP={c.tp}")
    elif subcommand == "mcore-to-hf":
        convert.mcore_to_hf_checkpoint(c.mcore, c.out, c.hf_format, c.tokenizer, c.vocab_size,
                                       int(c.max_shard_size_gb * 1024**3))
        print(f"wrote {c.out} ({c.hf_format} format)")
    else:
        model = convert.reshard_checkpoint(c.mcore, c.out, c.tp, c.pp, c.vpp)
        print(f"wrote {c.out}: TP={c.tp} PP={c.pp}, vocabulary padded to "
              f"{model.padded_vocab_size} rows")


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    subcommand, rest = argv[0], argv[1:]
    if subcommand not in SUBCOMMANDS:
        raise SystemExit(f"error: unknown subcommand {subcommand!r}; choose "
                         f"{', '.join(SUBCOMMANDS)}")
    cfg = load_config(SUBCOMMANDS[subcommand], rest, description=SUBCOMMANDS[subcommand]
                      .__dataclass_fields__["convert"].default_factory.__doc__)
    # megatron-core warns at import about missing GPU kernels (Apex/TE), irrelevant to conversion
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch)\.")
    try:
        run(subcommand, cfg)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}")
