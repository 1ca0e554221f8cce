"""Reward-model recipes and settings: every shipped recipe loads, bad settings fail in one line."""

from pathlib import Path

import pytest
import yaml

from megatron_qwen.config import build_config, load_config
from megatron_qwen.rlhf.deepspeed_config import ds_config_from_group
from megatron_qwen.rlhf.reward_config import RewardModelConfig
from megatron_qwen.rlhf.reward_scoring import ScoreConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted(EXAMPLES.glob("rm_*.yaml"))


def test_recipes_ship():
    names = {p.name for p in RECIPES}
    assert {"rm_pmp_7b.yaml", "rm_finetune_7b.yaml", "rm_tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe):
    cfg = build_config(RewardModelConfig, yaml.safe_load(recipe.read_text()))
    if "_7b" in recipe.name or "_14b" in recipe.name:  # the report's settings
        assert (cfg.optim.lr, cfg.optim.global_batch_size, cfg.data.seq_length, cfg.optim.epochs,
                cfg.optim.lr_warmup_iters) == (3e-6, 64, 2048, 1, 0)
        assert cfg.deepspeed.bf16
        ds = ds_config_from_group(cfg.deepspeed, micro_batch_size=cfg.optim.micro_batch_size,
                                  global_batch_size=cfg.optim.global_batch_size, world_size=8)
        assert ds["train_batch_size"] == 64
        assert ds["gradient_accumulation_steps"] * 8 * cfg.optim.micro_batch_size == 64


def _error(argv, cls=RewardModelConfig):
    with pytest.raises(SystemExit) as info:
        load_config(cls, argv)
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


BASE = ["--model-path", "m", "--train-data-path", "t.jsonl", "--save", "out"]


def test_bad_settings_fail_in_one_line():
    assert "zero_stage=5" in _error(BASE + ["--zero-stage", "5"])
    assert "offload_param needs zero_stage 3" in _error(BASE + ["--offload-param"])
    assert "model.model_path is required" in _error(["--train-data-path", "t", "--save", "o"])
    assert "keep nothing" in _error(["--model-path", "m", "--train-data-path", "t"])
    assert "ckpt_step needs checkpoint.load" in _error(BASE + ["--ckpt-step", "3"])
    assert "not a multiple" in _error(BASE + ["--global-batch-size", "10", "--micro-batch-size", "4"])
    assert "wandb_mode" in _error(BASE + ["--wandb-mode", "sometimes"])
    assert "input_path" in _error(["--model-path", "m"], ScoreConfig)


def test_megatron_and_group_spellings():
    cfg = load_config(RewardModelConfig, BASE + ["--lr", "1e-5", "--deepspeed.zero_stage", "3",
                                                 "--global-batch-size", "8", "--offload-param"])
    assert cfg.optim.lr == 1e-5 and cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.offload_param
    assert cfg.optim.global_batch_size == 8


def test_unusable_data_fails_before_training(tmp_path):
    """Missing or empty pair files stop the trainer with one line, before any process starts."""
    from megatron_qwen.rlhf.reward_trainer import main

    base = ["--model-path", str(tmp_path), "--save", str(tmp_path / "out")]
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(SystemExit, match=r"^error: .*missing.jsonl: cannot open"):
        main(base + ["--train-data-path", str(missing)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "a"}\nnot json\n')
    with pytest.raises(SystemExit, match=r"^error: .*bad.jsonl: 0 usable pairs, fewer than one global batch"):
        main(base + ["--train-data-path", str(bad)])
