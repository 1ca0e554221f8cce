"""The three conversions behind ``tools/convert_checkpoint.py``.

Each one reads its source tensor by tensor (or layer by layer), checks every name and shape
before anything is written, builds the output in a temporary directory beside ``--out`` and
renames it into place only when complete. Peak memory is one copy of the model (the full set of
megatron-core tensors handed to ``dist_checkpointing.save``) for ``hf-to-mcore`` and ``reshard``,
and one output shard plus one layer for ``mcore-to-hf``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from megatron_qwen.checkpoint.hf_io import (HFCheckpointReader, HFCheckpointWriter,
                                            atomic_directory, read_json, write_json)
from megatron_qwen.checkpoint.mapping import (GLOBAL_ROLES, HF_FORMATS, CheckpointError, Shape,
                                              detect_format, hf_config_from_model, hf_names,
                                              hf_to_mcore,
                                              mcore_name, mcore_to_hf, model_config_from_hf,
                                              pad_vocab)
from megatron_qwen.checkpoint.mcore_io import McoreCheckpointReader, save_mcore_checkpoint
from megatron_qwen.config import ConfigError, ModelConfig, ParallelConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EOS_TOKEN_ID = 151643  # <|endoftext|>
# Buffers some HF checkpoints carry that are recomputed, not learned.
_IGNORED_HF = re.compile(r".*(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def _parallel(tp: int, pp: int, vpp: Optional[int], cfg: ModelConfig) -> ParallelConfig:
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    try:
        parallel.validate()
        parallel.check_model(cfg)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return parallel


def mcore_model_config(hf_config: dict, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                       where: str = "config.json") -> Tuple[ModelConfig, ParallelConfig, int]:
    """(ModelConfig, ParallelConfig, HF row count) that ``hf-to-mcore --tp/--pp/--vpp`` writes
    for an HF ``config.json``: the vocabulary padded to a multiple of 128 x TP."""
    cfg, rows = model_config_from_hf(hf_config, where)
    parallel = _parallel(tp, pp, vpp, cfg)
    cfg.padded_vocab_size = cfg.vocab_size_padded(tp)
    return cfg, parallel, rows


def hf_to_mcore_checkpoint(hf_dir: str, out: str, tp: int = 1, pp: int = 1,
                           vpp: Optional[int] = None, dtype: Optional[str] = None) -> ModelConfig:
    """An HF checkpoint (qwen or qwen2 layout) -> a megatron-core torch_dist checkpoint."""
    reader = HFCheckpointReader(hf_dir)
    where = str(Path(hf_dir) / "config.json")
    fmt = detect_format(reader.config, where)
    cfg, parallel, rows = mcore_model_config(reader.config, tp, pp, vpp, where)
    s = Shape.of(cfg, rows)
    cast = DTYPES[dtype] if dtype else None
    layers = [None, *range(cfg.num_layers)]
    expected = {name for layer in layers for name in hf_names(fmt, layer).values()}
    unexpected = [n for n in reader.names() if n not in expected and not _IGNORED_HF.match(n)]
    if unexpected:  # fail before reading anything: the config does not describe these weights
        raise CheckpointError(f"{hf_dir}: unexpected tensor {unexpected[0]} "
                              f"({len(unexpected)} in all) for a {cfg.num_layers}-layer "
                              f"{fmt} model; is config.json the right one?")
    tensors: Dict[str, torch.Tensor] = {}
    for layer in layers:
        for role, t in hf_to_mcore(fmt, reader.get, s, layer).items():
            if role in ("embedding", "output"):
                t = pad_vocab(t, cfg.padded_vocab_size)
            tensors[mcore_name(role, layer)] = t.to(cast) if cast else t
    generation = Path(hf_dir) / "generation_config.json"
    meta = {"format_version": 1, "hf_vocab_size": rows, "hf_format": fmt,
            "hf_config": reader.config, "source": str(Path(hf_dir).resolve()),
            "hf_generation_config": read_json(generation) if generation.is_file() else None}
    with atomic_directory(out) as tmp:
        save_mcore_checkpoint(tmp, tensors, cfg, parallel, meta)
    return cfg


def _hf_vocab_rows(reader: McoreCheckpointReader, override: Optional[int]) -> int:
    """Rows of the exported embedding: recorded at import, else the tokenizer size padded to 128."""
    rows = override or reader.meta.get("hf_vocab_size") or dataclasses.replace(
        reader.cfg, padded_vocab_size=None).vocab_size_padded(1)
    if rows > reader.vocab_rows:
        raise CheckpointError(f"{reader.dir}: the embedding has {reader.vocab_rows} rows, fewer than "
                              f"the {rows} to export")
    return rows


def mcore_to_hf_checkpoint(mcore_dir: str, out: str, hf_format: str = "qwen2",
                           tokenizer: Optional[str] = "auto", vocab_size: Optional[int] = None,
                           max_shard_bytes: int = 2 * 1024**3) -> None:
    """A megatron-core torch_dist checkpoint -> HF safetensors shards + index, config, tokenizer.

    ``tokenizer``: ``auto`` writes the Qwen tokenizer (dashscope's ``qwen.tiktoken``) when the
    vocabulary is Qwen's, ``none`` writes none, anything else is a ``.tiktoken`` file or a
    directory holding one.
    """
    if hf_format not in HF_FORMATS:
        raise CheckpointError(f"--hf-format {hf_format!r}: choose one of {', '.join(HF_FORMATS)}")
    reader = McoreCheckpointReader(mcore_dir)
    cfg = reader.cfg
    rows = _hf_vocab_rows(reader, vocab_size)
    s = Shape.of(cfg, rows)
    dtype = reader.dtype()
    eos = EOS_TOKEN_ID if rows > EOS_TOKEN_ID else None
    hf_config = hf_config_from_model(cfg, hf_format, rows, dtype, eos_token_id=eos,
                                     original=reader.meta.get("hf_config"))
    with_tokenizer = tokenizer not in (None, "none") and (tokenizer != "auto" or rows >= 151851)
    if with_tokenizer:  # a missing vocabulary fails now, not after the weights are written
        from megatron_qwen.tokenizer.qwen import TokenizerError, resolve_vocab_file

        try:
            resolve_vocab_file(None if tokenizer == "auto" else tokenizer)
        except TokenizerError as exc:
            raise CheckpointError(str(exc)) from None
    with atomic_directory(out) as tmp:
        writer = HFCheckpointWriter(tmp, max_shard_bytes)
        for layer in range(cfg.num_layers):
            for name, t in mcore_to_hf(hf_format, reader.load(layer), s, layer).items():
                writer.add(name, t)
        for role in GLOBAL_ROLES:  # one vocabulary matrix in memory at a time
            for name, t in mcore_to_hf(hf_format, reader.load(None, [role]), s, None).items():
                writer.add(name, t)
        writer.finish()
        write_json(tmp / "config.json", hf_config)
        write_json(tmp / "generation_config.json", _generation_config(reader.meta, hf_format, eos))
        if with_tokenizer:
            from megatron_qwen.checkpoint.tokenizer_files import write_tokenizer_files

            write_tokenizer_files(tmp, hf_format, None if tokenizer == "auto" else tokenizer,
                                  model_max_length=cfg.max_position_embeddings)


def _generation_config(meta: dict, hf_format: str, eos: Optional[int]) -> dict:
    """The source's generation_config.json when it was the same layout, else greedy defaults."""
    if meta.get("hf_generation_config") and meta.get("hf_format") == hf_format:
        return dict(meta["hf_generation_config"])
    gen = {"do_sample": False, "max_new_tokens": 512}
    if eos is not None:
        gen.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if hf_format == "qwen":  # fields the released QWen generate() reads
        gen.update(chat_format="raw", stop_words_ids=[[eos]] if eos is not None else [])
    return gen


def reshard_checkpoint(mcore_dir: str, out: str, tp: int = 1, pp: int = 1,
                       vpp: Optional[int] = None) -> ModelConfig:
    """A torch_dist checkpoint -> the same weights for another TP/PP (vocabulary re-padded)."""
    reader = McoreCheckpointReader(mcore_dir)
    cfg = dataclasses.replace(reader.cfg, padded_vocab_size=None)
    parallel = _parallel(tp, pp, vpp, cfg)
    cfg.padded_vocab_size = cfg.vocab_size_padded(tp)
    rows = _hf_vocab_rows(reader, None)
    if cfg.padded_vocab_size < rows:  # keep every real row, padded for this TP
        multiple = cfg.make_vocab_size_divisible_by * tp
        cfg.padded_vocab_size = -(-rows // multiple) * multiple
    tensors: Dict[str, torch.Tensor] = {}
    for role in GLOBAL_ROLES:  # one at a time: the read briefly holds ~1.4x the tensor
        t = reader.load(None, [role])[role]
        tensors[mcore_name(role)] = t if role == "final_norm" else pad_vocab(t, cfg.padded_vocab_size)
    for layer in range(cfg.num_layers):
        for role, t in reader.load(layer).items():
            tensors[mcore_name(role, layer)] = t
    meta = {**reader.meta, "format_version": 1, "hf_vocab_size": rows,
            "source": str(Path(mcore_dir).resolve())}
    meta.pop("model", None), meta.pop("parallel", None)
    with atomic_directory(out) as tmp:
        save_mcore_checkpoint(tmp, tensors, cfg, parallel, meta)
    return cfg
