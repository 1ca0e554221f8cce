"""What would fail later (at the first forward on a GPU, at the first save, in a kernel) is
refused at start with one line naming the fields: the attention-kernel rules (pure, so the GPU
case runs here), and the real entry points on bad settings (subprocesses, exit status != 0)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_qwen.config import ConfigError, build_config
from tests.dist import REPO

GPU_OK = dict(dtype=torch.bfloat16, device_type="cuda", flash_available=True, head_dim=128)


@pytest.mark.parametrize("change, needle", [
    ({"dtype": torch.float32}, "takes bf16/fp16 only and this run computes in float32"),
    ({"flash_available": False}, "needs the flash_attn package"),
    ({"device_type": "cpu"}, "runs on CUDA GPUs only"),
    ({"head_dim": 512}, "head dims up to 256"),
    ({"mask_from": "train.task=sft"}, "causal-only and train.task=sft feeds it an explicit attention mask"),
])
def test_flash_refusals(change, needle):
    from megatron_qwen.model.attention import check_attention_kernel

    check_attention_kernel("flash", **GPU_OK)  # the valid GPU case
    with pytest.raises(ConfigError, match="model.attention_backend=flash") as exc:
        check_attention_kernel("flash", **{**GPU_OK, **change})
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_other_backends_take_masks_fp32_and_cpu(backend):
    from megatron_qwen.model.attention import check_attention_kernel

    check_attention_kernel(backend, torch.float32, "cpu", False, 512, mask_from="train.task=sft")
    with pytest.raises(ConfigError, match="choose sdpa, flash, unfused"):
        check_attention_kernel("flashy", torch.float32, "cpu", False, 64)


def _cfg(**groups):
    from megatron_qwen.training.config import PretrainConfig

    recipe = {"model": {"preset": "tiny", "attention_backend": "flash"}, "optim": {"bf16": True},
              "data": {"data_path": ["d"]}}
    for group, values in groups.items():
        recipe[group] = {**recipe.get(group, {}), **values}
    return build_config(PretrainConfig, recipe)


@pytest.mark.parametrize("groups, needle", [
    ({"optim": {"bf16": False}}, "computes in float32 (optim.bf16=false)"),
])
def test_trainer_config_refuses_what_flash_refuses_on_a_gpu(groups, needle):
    _cfg().check_kernels(on_gpu=True, flash_available=True)  # pretraining, bf16: runs
    with pytest.raises(ConfigError, match="model.attention_backend=flash") as exc:
        _cfg(**groups).check_kernels(on_gpu=True, flash_available=True)
    assert needle in str(exc.value)
    _cfg(model={"attention_backend": "sdpa"}, **groups).check_kernels(on_gpu=True, flash_available=True)


@pytest.mark.parametrize("groups", [
    {"train": {"task": "sft"}, "sft": {"sft_data_path": "x.jsonl"}},
    {"train": {"task": "sft"}, "sft": {"sft_data_path": "x.jsonl", "sft_packing": False}},
    {"data": {"reset_attention_mask": True}},
])
def test_packed_documents_run_on_flash(groups):
    """Separated documents reach the attention as cu_seqlens (flash_attn_varlen_func), no mask."""
    cfg = _cfg(**groups)
    assert cfg.packs_documents() and cfg.attention_mask_source() is None
    cfg.check_kernels(on_gpu=True, flash_available=True)


def test_compute_dtype_follows_the_trainer():
    assert _cfg().compute_dtype(on_gpu=True) == torch.bfloat16
    assert _cfg().compute_dtype(on_gpu=False) == torch.float32  # a CPU run drops --bf16
    assert _cfg(optim={"bf16": False}).compute_dtype(on_gpu=True) == torch.float32


# --------------------------------------------------------------------------- real entry points


def _run(*argv: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1, proc.stderr[-2000:]
    return proc.returncode, errors[0]


@pytest.mark.parametrize("argv, needle", [
    (["--seq-length", "0"], "model.seq_length=0 must be >= 1"),  # was SIGFPE (exit 136)
    (["--save", "{file}/sub"], "checkpoint.save={file}/sub: cannot write there"),  # was at the first save
    (["--attention-backend", "flash"], "model.attention_backend=flash needs the flash_attn package"),
])
def test_pretrain_refuses_at_start(tmp_path, argv, needle):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = [a.replace("{file}", str(blocker)) for a in argv]
    # the data do not exist: the refusal must come before the data are read
    code, line = _run("pretrain_qwen.py", "--config", "examples/sft_tiny.yaml",
                      "--sft-data-path", str(tmp_path / "missing.jsonl"), "--pretrained-checkpoint", "none",
                      "--save", str(tmp_path / "ckpt"), *argv)
    assert code != 0 and needle.replace("{file}", str(blocker)) in line, line


@pytest.mark.parametrize("patch, needle", [
    ({"num_hidden_layers": "2"}, "field 'num_hidden_layers' must be an integer, got '2'"),
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be >= 1"),
])
def test_hf_to_mcore_bad_config_json(tmp_path, patch, needle):
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2).to_diff_dict()
    config["architectures"] = ["Qwen2ForCausalLM"]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **patch}))
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(64, 16)}, tmp_path / "hf" / "model.safetensors")
    code, line = _run("tools/convert_checkpoint.py", "hf-to-mcore", "--hf", str(tmp_path / "hf"),
                      "--out", str(tmp_path / "out"))
    assert code != 0 and needle in line and "config.json" in line, line
    assert not (tmp_path / "out").exists()
