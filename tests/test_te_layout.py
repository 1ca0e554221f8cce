"""Transformer Engine selection and the TE <-> local checkpoint layouts, on CPU (no TE here).

What runs here: the choice of layer implementation and every refusal (pure functions: the
machine is an argument), the settings that reach megatron-core's TransformerConfig, and the
checkpoint interchange by key mapping (a checkpoint written with the TE names megatron-core's own
local spec declares, loaded into our local model bit-exactly; the reverse rename). A real TE
model building, training or loading is unverified on GPU (bench/te_check.py on a GPU)."""

import dataclasses

import pytest
import torch

from megatron_qwen.config import ConfigError, ParallelConfig
from megatron_qwen.model import build_model, transformer_config
from megatron_qwen.model.layer_spec import choose_transformer_impl, qwen_layer_spec
from megatron_qwen.runtime import destroy, init_distributed

TE, LOCAL = "transformer_engine", "local"
SP2 = dict(tensor_model_parallel_size=2, sequence_parallel=True)


def _model(tiny, **fields):
    return dataclasses.replace(tiny, **fields)


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("on_gpu, te, fields, mask, want", [
    (True, True, {}, None, TE),  # auto: TE importable on a GPU
    (True, False, {}, None, LOCAL),  # auto: no TE
    (False, True, {}, None, LOCAL),  # auto: no GPU
    (True, True, {"use_logn_attn": True}, None, LOCAL),  # auto: LogN is local-only
    (True, True, {"window_sizes": [None, 8, None, None]}, None, LOCAL),
    (True, True, {}, "train.task=sft (sft.sft_packing=true)", LOCAL),  # explicit mask
    (True, True, {"transformer_impl": LOCAL}, None, LOCAL),
    (True, True, {"fp8_format": "hybrid"}, None, TE),  # auto, and FP8 needs TE: TE
])
def test_choice(tiny, on_gpu, te, fields, mask, want):
    assert choose_transformer_impl(_model(tiny, **fields), ParallelConfig(), on_gpu, te, mask) == want


@pytest.mark.parametrize("on_gpu, te, fields, parallel, mask, message", [
    (True, False, {"transformer_impl": TE}, {}, None,
     r"model.transformer_impl=transformer_engine, which does not import here \(pip install"),
    (False, True, {"transformer_impl": TE}, {}, None, "runs on CUDA GPUs only"),
    (True, True, {"transformer_impl": TE, "use_logn_attn": True}, {}, None,
     "does not support model.use_logn_attn=true"),
    (True, True, {"transformer_impl": TE, "window_sizes": [4, 4, 4, 4]}, {}, None,
     "does not support model.window_sizes"),
    (True, True, {"transformer_impl": TE}, {}, "data.reset_attention_mask=true",
     "does not support data.reset_attention_mask=true"),
    (True, True, {"transformer_impl": LOCAL, "fp8_format": "e4m3"}, {}, None,
     "model.fp8_format=e4m3 needs Transformer Engine layers and this run asks for model.transformer_impl=local"),
    (False, False, {"fp8_format": "hybrid"}, {}, None,
     "model.fp8_format=hybrid needs Transformer Engine, which does not import here"),
    (True, False, {}, SP2 | {"tp_comm_overlap": True}, None,
     "parallel.tp_comm_overlap=true needs Transformer Engine, which does not import here"),
    (True, True, {"transformer_impl": LOCAL}, {"context_parallel_size": 2}, None,
     "parallel.context_parallel_size=2 needs Transformer Engine layers"),
    (True, True, {"fp8_format": "hybrid", "use_logn_attn": True}, {}, None,
     "model.fp8_format=hybrid needs Transformer Engine, which does not support model.use_logn_attn"),
])
def test_refusals_are_one_line(tiny, on_gpu, te, fields, parallel, mask, message):
    with pytest.raises(ConfigError, match=message) as err:
        choose_transformer_impl(_model(tiny, **fields), ParallelConfig(**parallel), on_gpu, te, mask)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fields, parallel, message", [
    ({"transformer_impl": "te"}, {}, "model.transformer_impl='te': choose transformer_engine or local"),
    ({"fp8_format": "e5m2"}, {}, "model.fp8_format='e5m2': choose hybrid or e4m3"),
    ({}, {"tp_comm_overlap": True, "tensor_model_parallel_size": 2},
     "parallel.tp_comm_overlap needs tensor_model_parallel_size > 1 with sequence_parallel"),
    ({}, {"tp_comm_overlap": True}, "parallel.tp_comm_overlap needs tensor_model_parallel_size > 1"),
    ({}, {"context_parallel_size": 0}, "parallel.context_parallel_size must be >= 1"),
    ({"seq_length": 36}, {"context_parallel_size": 4},
     "context_parallel_size=4: model.seq_length=36 must be a multiple of 2 x 4"),
])
def test_bad_values_are_refused_by_their_group(tiny, fields, parallel, message):
    from megatron_qwen.model import check_layout

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        check_layout(_model(tiny, **fields), ParallelConfig(**parallel))
    assert "\n" not in str(err.value)


def test_flags_spell_as_megatron_lm():
    from megatron_qwen.config import parse_overrides
    from megatron_qwen.training.config import PretrainConfig

    got = parse_overrides(PretrainConfig, [
        "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid",
        "--tp-comm-overlap", "--context-parallel-size", "2"])
    assert got == {"model": {"transformer_impl": TE, "fp8_format": "hybrid"},
                   "parallel": {"tp_comm_overlap": True, "context_parallel_size": 2}}


def test_trainer_choice_adds_the_data_mask_and_counts_context_parallel_ranks(tiny):
    """SFT's packed documents go as THD (no dense mask), so TE is chosen for them too, but never
    with context parallelism; CP ranks are not data ranks."""
    from megatron_qwen.training.config import PretrainConfig

    cfg = PretrainConfig(model=_model(tiny), train=dataclasses.replace(PretrainConfig().train, task="sft"))
    assert cfg.transformer_impl(on_gpu=True, te_available=True) == TE
    with pytest.raises(ConfigError, match="context_parallel_size=2 with train.task=sft: packed documents"):
        dataclasses.replace(cfg, parallel=ParallelConfig(context_parallel_size=2)).check_kernels(True, True, True)
    cp = PretrainConfig(model=_model(tiny), parallel=ParallelConfig(context_parallel_size=2),
                        train=dataclasses.replace(PretrainConfig().train, global_batch_size=4))
    assert cp.transformer_impl(on_gpu=True, te_available=True) == TE
    with pytest.raises(ConfigError, match="needs Transformer Engine, which runs on CUDA GPUs only"):
        cp.check_kernels(on_gpu=False, flash_available=False, te_available=True)
    assert cp.check_world(8) == 4  # 8 ranks = 2 CP x 4 DP
    with pytest.raises(ConfigError, match="not divisible by tensor x pipeline x context parallel = 1 x 1 x 2"):
        cp.check_world(3)


def test_context_parallel_pieces_on_two_ranks():
    """RoPE rows, batch split and the logged loss under CP=2 (tests/scripts/context_parallel_units.py;
    the CP attention itself is TE's: unverified on GPU)."""
    from tests.dist import REPO, run_torchrun

    assert "CP_UNITS_OK" in run_torchrun(REPO / "tests/scripts/context_parallel_units.py", timeout=300)


def test_settings_reach_transformer_config(tiny, monkeypatch):
    """On the machine the TE path needs (a GPU with TE: stood in for by the two facts the choice
    reads), the run's FP8 / TP-overlap / CP settings are megatron-core's TransformerConfig fields."""
    from megatron_qwen.model import layer_spec

    monkeypatch.setattr(layer_spec, "te_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = transformer_config(_model(tiny, fp8_format="hybrid"),
                             ParallelConfig(context_parallel_size=2, tp_comm_overlap=True, **SP2),
                             params_dtype=torch.bfloat16)
    assert (cfg.transformer_impl, cfg.fp8, cfg.tp_comm_overlap, cfg.context_parallel_size,
            cfg.normalization, cfg.add_qkv_bias, cfg.gated_linear_unit, cfg.add_bias_linear) == (
        TE, "hybrid", True, 2, "RMSNorm", True, True, False)
    monkeypatch.undo()
    local = transformer_config(tiny, ParallelConfig())
    assert (local.transformer_impl, local.fp8, local.tp_comm_overlap, local.context_parallel_size) == (
        LOCAL, None, False, 1)


# --------------------------------------------------------------------------- checkpoint layouts


@pytest.fixture(scope="module")
def world():
    init_distributed(ParallelConfig(), seed=3)
    yield
    destroy()


def _megatron_te_names(sharded: dict) -> dict:
    """The sharded state dict with megatron-core's own statement of the TE names applied (its
    local GPT spec's ``sharded_state_dict_keys_map``, with megatron-core's function, on the
    layer-stacked keys) and TE's non-FP8 ``_extra_state`` (an empty uint8 tensor) on the linears."""
    from megatron.core.dist_checkpointing.utils import apply_prefix_mapping
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    apply_prefix_mapping(sharded, {f"decoder.layers.{a}": f"decoder.layers.{b}" for a, b in keys_map.items()})
    for k, item in sharded.items():
        if k.endswith("._extra_state"):
            item.data = torch.empty(0, dtype=torch.uint8)
    return sharded


def _loss(model, tokens):
    labels = tokens.roll(-1, dims=1)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.size(1))[None], None, labels=labels).float().mean()


def _save(state: dict, directory):
    from megatron.core import dist_checkpointing

    directory.mkdir()
    dist_checkpointing.save({"model": state}, str(directory))
    return directory


def _trainer_load(chunks, directory):
    from megatron_qwen.training.checkpoint import load_checkpoint
    from megatron_qwen.training.config import PretrainConfig

    # a weights-only checkpoint: the model only (no optimizer or scheduler is touched)
    assert load_checkpoint(directory, chunks, None, None, PretrainConfig()) == (0, 0)


def _converter_load(chunks, directory):
    from megatron_qwen.checkpoint.mcore_io import load_model_weights

    load_model_weights(chunks, directory)


@pytest.mark.parametrize("load", [_trainer_load, _converter_load], ids=["trainer", "converter"])
def test_te_layout_checkpoint_loads_into_the_local_model_bit_exactly(world, tiny, tmp_path, load):
    """Both model loads (the trainer's --load / --pretrained-checkpoint, and the converter's and
    inference's) read a checkpoint written in the TE layout."""
    from megatron_qwen.checkpoint import safe_load
    from megatron_qwen.checkpoint.te_layout import LOCAL_TO_TE

    torch.manual_seed(0)
    (source,) = build_model(tiny, ParallelConfig())
    with torch.no_grad():  # norms away from 1, so a norm that is not loaded shows
        for name, p in source.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    te_ckpt = _save(_megatron_te_names(source.sharded_state_dict()), tmp_path / "te")
    saved = set(safe_load.load_tensors_metadata(te_ckpt))
    assert set(LOCAL_TO_TE.values()) <= saved and not set(LOCAL_TO_TE) & saved  # written in TE names
    torch.manual_seed(1)
    (target,) = build_model(tiny, ParallelConfig())
    tokens = torch.randint(0, tiny.vocab_size, (2, 16))
    assert _loss(target, tokens) != _loss(source, tokens)
    load([target], te_ckpt)
    want, got = source.state_dict(), target.state_dict()
    for name, tensor in want.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(got[name], tensor), name
    assert _loss(target, tokens) == _loss(source, tokens)


def test_te_model_keys_map_to_a_local_checkpoint(world, tiny, tmp_path):
    """The reverse: a model asking in TE names (megatron-core's TE spec names, as above) for a
    local-layout checkpoint gets the local names, and the load fills every tensor."""
    from megatron_qwen.checkpoint import safe_load
    from megatron_qwen.checkpoint.te_layout import match_checkpoint_layout

    torch.manual_seed(2)
    (source,) = build_model(tiny, ParallelConfig())
    local_ckpt = _save(source.sharded_state_dict(), tmp_path / "local")
    torch.manual_seed(3)
    (target,) = build_model(tiny, ParallelConfig())
    request = {"model": _megatron_te_names(target.sharded_state_dict())}
    te_keys = {item.key for item in request["model"].values()}
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in te_keys
    assert match_checkpoint_layout(request, safe_load.load_tensors_metadata(local_ckpt)) == 2 * tiny.num_layers
    loaded = safe_load.load(request, local_ckpt)["model"]
    for name, tensor in source.state_dict().items():
        if isinstance(tensor, torch.Tensor) and not name.endswith("_extra_state"):
            assert torch.equal(loaded[name], tensor), name


def test_the_mapping_is_megatron_cores_statement_of_it():
    """te_layout's renames are exactly megatron-core's local-spec key map (RMSNorm: no bias)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_qwen.checkpoint.te_layout import LOCAL_TO_TE

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    assert LOCAL_TO_TE == {f"decoder.layers.{a}weight": f"decoder.layers.{b}weight" for a, b in keys_map.items()}
    assert qwen_layer_spec().submodules.sharded_state_dict_keys_map == {}  # ours saves local names
