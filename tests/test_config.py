import pytest

from megatron_qwen.config import (ConfigError, ModelConfig, ParallelConfig, build_config,
                                  load_model_config, parse_overrides)
import dataclasses


@dataclasses.dataclass
class _Cfg:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

    def validate(self):
        self.parallel.check_model(self.model)


def test_presets_match_report_table_1():
    expect = {"qwen_1p8b": (2048, 16, 24, 5504), "qwen_7b": (4096, 32, 32, 11008),
              "qwen_14b": (5120, 40, 40, 13696)}
    for name, (hidden, heads, layers, ffn) in expect.items():
        m = load_model_config(name)
        assert (m.hidden_size, m.num_attention_heads, m.num_layers, m.ffn_hidden_size) == (hidden, heads, layers, ffn)
        assert m.vocab_size == 151851 and m.norm_epsilon == 1e-6 and m.rotary_base == 10000.0
        # the released embedding's rows (Qwen-14B's config.json says 152,064)
        assert m.vocab_size_padded(1) == (152064 if name == "qwen_14b" else 151936)


def test_megatron_vocab_padding_depends_on_tp():
    m = load_model_config("qwen_7b")
    assert m.vocab_size_padded(2) == 152064 and m.vocab_size_padded(8) == 152576


def test_megatron_flag_names_and_group_flags():
    over = parse_overrides(_Cfg, ["--tensor-model-parallel-size", "2", "--model.num_layers=8",
                                  "--sequence-parallel", "--model.window-sizes", "[1, 2]"])
    assert over == {"parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
                    "model": {"num_layers": 8, "window_sizes": [1, 2]}}


def test_invalid_layout_fails_with_one_line_reason():
    with pytest.raises(ConfigError, match="does not divide the 4 attention heads"):
        build_config(_Cfg, {"model": {"preset": "tiny"}}, {"parallel": {"tensor_model_parallel_size": 3}})
    with pytest.raises(ConfigError, match="does not divide num_layers=4"):
        build_config(_Cfg, {"model": {"preset": "tiny"}}, {"parallel": {"pipeline_model_parallel_size": 3}})
    with pytest.raises(ConfigError, match="unknown setting --tensr"):
        parse_overrides(_Cfg, ["--tensr-model-parallel-size", "2"])
    with pytest.raises(ConfigError, match="unknown field"):
        build_config(_Cfg, {"model": {"hiden_size": 3}})


# --------------------------------------------------------------------------- recipes vs CLI


def _load(tmp_path, recipe: str, *argv: str):
    """PretrainConfig as pretrain_qwen.py reads it: --config FILE plus flags."""
    from megatron_qwen.config import load_config
    from megatron_qwen.training.config import PretrainConfig

    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    return load_config(PretrainConfig, ["--config", str(path), "--data-path", "d", *argv])


def _error(fn) -> str:
    with pytest.raises(SystemExit) as exc:
        fn()
    msg = str(exc.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_precedence_is_preset_then_recipe_then_command_line(tmp_path):
    recipe = "model:\n  preset: tiny\n  hidden_size: 128\n  seq_length: 64\n"
    cfg = _load(tmp_path, recipe)
    assert (cfg.model.hidden_size, cfg.model.seq_length, cfg.model.num_layers) == (128, 64, 4)
    # a preset named on the command line replaces the recipe's preset, not the recipe's fields
    cfg = _load(tmp_path, recipe, "--model.preset", "tiny_vocab")
    assert (cfg.model.hidden_size, cfg.model.seq_length, cfg.model.vocab_size) == (128, 64, 1000)
    cfg = _load(tmp_path, recipe, "--model.preset", "tiny_vocab", "--hidden-size", "256")
    assert (cfg.model.hidden_size, cfg.model.seq_length) == (256, 64)
    # a typo in the recipe is an error whichever preset is in force
    msg = _error(lambda: _load(tmp_path, "model:\n  hiden_size: 3\n", "--model.preset", "tiny"))
    assert "recipe.yaml" in msg and "hiden_size" in msg


def _recipe(**groups) -> str:
    """YAML of a tiny-model recipe with ``groups`` merged in (group=(field, raw YAML value))."""
    lines = {"model": ["  preset: tiny"]}
    for group, (field, raw) in groups.items():
        lines.setdefault(group, []).append(f"  {field}: {raw}")
    return "".join(f"{g}:\n" + "\n".join(body) + "\n" for g, body in lines.items())


@pytest.mark.parametrize("group, field, text", [
    ("optim", "lr", "1e-3"), ("optim", "bf16", "no"), ("optim", "bf16", "on"),
    ("optim", "clip_grad", "off"), ("train", "train_iters", "ten"),
    ("train", "micro_batch_size", "2.7"), ("optim", "clip_grad", "null"),
    ("checkpoint", "save_interval", "none"), ("model", "window_sizes", "[4, 4, 4, 4]"),
    ("model", "window_sizes", "[4, 4]"), ("checkpoint", "pretrained_checkpoint", "none"),
])
def test_recipe_strings_are_typed_as_the_command_line_types_them(tmp_path, group, field, text):
    """A quoted YAML value gives what the same text gives as a flag: the value, or the same
    one-line error naming the field."""
    yaml_run = lambda: _load(tmp_path, _recipe(**{group: (field, repr(text))}))  # noqa: E731
    cli_run = lambda: _load(tmp_path, _recipe(), f"--{group}.{field}", text)  # noqa: E731
    try:
        want = getattr(getattr(cli_run(), group), field)
    except SystemExit:
        assert field in _error(yaml_run) and field in _error(cli_run)
    else:
        assert getattr(getattr(yaml_run(), group), field) == want


@pytest.mark.parametrize("group, field, raw, needle", [
    ("train", "micro_batch_size", "2.7", "train.micro_batch_size: cannot read '2.7' as int"),
    ("optim", "bf16", "1.5", "optim.bf16"),
    ("optim", "clip_grad", "null", "optim.clip_grad: null is not allowed"),
    ("optim", "lr", "[1]", "optim.lr: expected float"),
    ("data", "data_path", "data/web", "data.data_path: expected a list"),
    ("model", "num_layers", "true", "model.num_layers"),
    ("model", "seq_length", "0", "model.seq_length=0 must be >= 1"),
    ("model", "seq_length", "-5", "model.seq_length=-5 must be >= 1"),
    ("model", "window_sizes", "[4, x, 4, 4]", "model.window_sizes"),
])
def test_wrong_recipe_types_are_one_line_errors(tmp_path, group, field, raw, needle):
    from megatron_qwen.config import load_config
    from megatron_qwen.training.config import PretrainConfig

    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe(**{group: (field, raw)}, data=("data_path", "[d]")) if group != "data"
                    else _recipe(data=(field, raw)))
    msg = _error(lambda: load_config(PretrainConfig, ["--config", str(path)]))
    assert needle in msg, msg


def test_a_group_that_is_not_a_mapping_is_one_line_error(tmp_path):
    assert "group 'optim' must be a mapping" in _error(lambda: _load(tmp_path, "model:\n  preset: tiny\noptim: 3\n"))


def test_recipe_numbers_and_booleans_keep_their_yaml_types(tmp_path):
    cfg = _load(tmp_path, "model:\n  preset: tiny\noptim:\n  lr: 1.0e-3\n  clip_grad: 0\n  bf16: no\n"
                          "train:\n  train_iters: 10\n")
    assert cfg.optim.lr == 1e-3 and cfg.optim.clip_grad == 0.0 and isinstance(cfg.optim.clip_grad, float)
    assert cfg.optim.bf16 is False and cfg.train.train_iters == 10


def _help_of(script, args, monkeypatch, capsys):
    """What ``script args`` prints, run in this process (as ``python script``)."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code in (0, None), (script, exit_.value.code)
    return capsys.readouterr().out


def test_every_flag_of_every_entry_point_has_a_description(monkeypatch, capsys):
    """`--help` of each tool, pretrain_qwen.py and example: a one-line description under every
    flag (a field's comment in the source, or its metadata["help"]); issue #15."""
    import argparse
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    runs = [(p, ["--help"]) for p in [*sorted((repo / "tools").glob("*.py")), repo / "pretrain_qwen.py"]
            if p.name != "convert_checkpoint.py"]
    runs += [(repo / "tools/convert_checkpoint.py", [sub, "--help"]) for sub in ("hf-to-mcore", "mcore-to-hf", "reshard")]
    for script, args in runs:
        lines = _help_of(script, args, monkeypatch, capsys).splitlines()
        flags = [i for i, line in enumerate(lines) if re.match(r"  --\S+ +\w+ +default:", line)]
        if flags:  # our config system's help: the description on the line below
            bare = [lines[i].split()[0] for i in flags
                    if not (i + 1 < len(lines) and lines[i + 1].startswith("      ") and lines[i + 1].strip())]
        else:  # a plain argparse tool: the help beside the flag or on the line below
            flags = [i for i, line in enumerate(lines) if re.match(r"  --\S+", line) and "--help" not in line]
            assert flags, (script.name, lines[:5])
            bare = [lines[i].split()[0] for i in flags
                    if not re.match(r"  --\S+( [A-Z_]+)?  +\S", lines[i])
                    and not (i + 1 < len(lines) and lines[i + 1].startswith("        ") and lines[i + 1].strip())]
        assert not bare, f"{script.name} {args[0]}: no description for {bare}"
    # the argparse examples: every action but -h has its help
    parsers = []

    def capture(self, *a, **k):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    examples = sorted((repo / "examples").glob("*.py"))
    for script in examples:
        _help_of(script, [], monkeypatch, capsys)
        bare = [a.option_strings for a in parsers[-1]._actions if a.dest != "help" and not a.help]
        assert not bare, f"{script.name}: no description for {bare}"
    assert len(parsers) == len(examples)  # each example parsed its own flags
