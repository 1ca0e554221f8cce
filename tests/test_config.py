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
