"""Every shipped recipe (examples/*.yaml) loads through its entry point's config, passes the
checks its kernels would make on the machine it is written for, and builds (at one layer, on the
meta device: nothing allocated) a Megatron model whose tensors have exactly the global shapes
``hf-to-mcore`` writes for its base model at the recipe's TP: the shapes megatron-core checks when
the converted base is loaded with ``--pretrained-checkpoint``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_qwen.config import load_config
from tests.dist import REPO

RECIPES = sorted((REPO / "examples").glob("*.yaml"))
# Embedding rows of the HF checkpoint each preset starts from (QWEN_SPEC.md: the released
# config.json vocab_size; the tiny models' base is an export of our own, 151,851 padded to 128).
RELEASED_ROWS = {"qwen_1p8b": 151936, "qwen_7b": 151936, "qwen_14b": 152064, "tiny": 151936}


def entry_point_config(path: Path) -> type:
    """The config class of the entry point that runs ``path`` (as its header comment says)."""
    if path.name.startswith("rm_"):  # tools/train_reward_model.py
        from megatron_qwen.rlhf.reward_config import RewardModelConfig
        return RewardModelConfig
    if path.name.startswith("ppo_"):  # tools/train_ppo.py
        from megatron_qwen.rlhf.ppo.config import PPOTrainConfig
        return PPOTrainConfig
    from megatron_qwen.training.config import PretrainConfig  # pretrain_qwen.py
    return PretrainConfig


def load_recipe(path: Path):
    try:
        return load_config(entry_point_config(path), ["--config", str(path)])
    except SystemExit as exc:  # the entry point's one-line error
        pytest.fail(f"{path.name}: {exc.code}")


def test_every_recipe_is_covered():
    assert len(RECIPES) >= 19
    names = {p.name for p in RECIPES}
    assert {"sft_7b.yaml", "sft_14b.yaml", "math_sft_7b.yaml", "code_sft_7b.yaml",
            "code_pretrain_14b.yaml", "rm_tiny_cpu.yaml", "ppo_7b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_validates(path):
    cfg = load_recipe(path)
    from megatron_qwen.training.config import PretrainConfig

    if not isinstance(cfg, PretrainConfig):
        return
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    cfg.check_world(tp * pp)
    # A GPU recipe (bf16) must pass what its kernels check on a GPU with flash_attn installed;
    # a CPU recipe what they check on a CPU-only machine.
    on_gpu = cfg.optim.bf16
    cfg.check_kernels(on_gpu=on_gpu, flash_available=on_gpu)


def _model_global_shapes(model_cfg) -> dict:
    """{dist-checkpoint key: global shape} the model asks for when it loads a checkpoint."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_qwen.config import ParallelConfig
    from megatron_qwen.model.builder import build_model, transformer_config
    from megatron_qwen.runtime.distributed import world_of_one

    with world_of_one(model_parallel=True):
        parallel = ParallelConfig()
        config = transformer_config(model_cfg, parallel, torch.bfloat16, use_cpu_initialization=True)
        with torch.device("meta"):
            (model,) = build_model(model_cfg, parallel, config=config)
            items = list(model.sharded_state_dict().values())
            shapes = {}
            while items:
                item = items.pop()
                if isinstance(item, ShardedTensorFactory):
                    built = item.build()
                    items.extend(built.values() if isinstance(built, dict) else
                                 built if isinstance(built, (list, tuple)) else [built])
                elif isinstance(item, ShardedTensor):
                    assert shapes.setdefault(item.key, tuple(item.global_shape)) == tuple(item.global_shape)
    return shapes


MODEL_RECIPES = [p for p in RECIPES if entry_point_config(p).__name__ == "PretrainConfig"]


@pytest.mark.parametrize("path", MODEL_RECIPES, ids=lambda p: p.stem)
def test_recipe_model_matches_converted_base(path):
    from megatron_qwen.checkpoint.convert import mcore_model_config
    from megatron_qwen.checkpoint.mapping import hf_config_from_model
    from megatron_qwen.checkpoint.mcore_io import checkpoint_shapes
    from megatron_qwen.config import load_model_config

    cfg = load_recipe(path)
    tp = cfg.parallel.tensor_model_parallel_size
    preset = cfg.model.preset
    assert preset in RELEASED_ROWS, f"{path.name}: preset {preset!r} has no base checkpoint shape"
    # what hf-to-mcore --tp <recipe TP> writes for the base model (at one layer)
    base = dataclasses.replace(load_model_config(preset), num_layers=1)
    hf_config = hf_config_from_model(base, "qwen", RELEASED_ROWS[preset], torch.bfloat16)
    converted, _, _ = mcore_model_config(hf_config, tp=tp)
    want = checkpoint_shapes(converted)
    # the recipe's model at one layer, with the vocabulary its TP gives it (the backend and the
    # recompute setting change no shape; flash_attn is not installed here)
    model_cfg = dataclasses.replace(cfg.model, num_layers=1, window_sizes=None,
                                    padded_vocab_size=cfg.model.vocab_size_padded(tp),
                                    attention_backend="sdpa", recompute_granularity=None)
    got = _model_global_shapes(model_cfg)
    assert got == want, (f"{path.name}: model shapes differ from hf-to-mcore --tp {tp}: "
                         f"{ {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)} }")
