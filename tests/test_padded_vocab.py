"""Padded vocabulary rows stay out of the softmax: a checkpoint converted for TP=2 (151,936 rows
padded with zeros to 152,064) evaluated by tools/eval_ppl.py at TP=2 (2 gloo processes) reads
transformers' perplexity for the same weights (before: 128 zero logits in every softmax)."""

import json
import math
from pathlib import Path

import torch

from megatron_qwen.checkpoint.cli import main as convert
from megatron_qwen.config import ModelConfig
from megatron_qwen.inference import perplexity as ppl
from megatron_qwen.tokenizer import load_tokenizer
from tests.dist import REPO, run_torchrun
from tests.scripts.model_common import hf_reference

DATA = Path(__file__).parent / "data" / "multilingual.jsonl"


def test_perplexity_at_tp2_with_padded_rows_equals_transformers(tmp_path):
    from megatron.core.dist_checkpointing import load_tensors_metadata

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=88,
                      vocab_size=151851, seq_length=64, max_position_embeddings=64)
    hf_model = hf_reference(cfg, seed=5)  # 151,936 rows: no padding at TP=1
    hf_model.save_pretrained(tmp_path / "hf")
    convert(["hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mc"), "--tp", "2"])
    meta = load_tensors_metadata(str(tmp_path / "mc/iter_0000000"))
    assert tuple(meta["output_layer.weight"].global_shape) == (152064, 32)
    out = tmp_path / "table.json"
    run_torchrun(REPO / "tools/eval_ppl.py", "--load", tmp_path / "mc", "--data", DATA,
                 "--seq-lengths", 64, "--num-samples", 3, "--packing", "concat",
                 "--combinations", "plain", "--tensor-model-parallel-size", 2, "--output", out, nproc=2)
    ours = json.loads(out.read_text())["perplexity"]["plain RoPE"]["64"]
    tok = load_tokenizer()
    samples = ppl.make_samples(ppl.load_documents(str(DATA), tok), 64, 3, "concat", tok.eod_id)
    with torch.no_grad():
        logits = hf_model(samples[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), samples[:, 1:].reshape(-1))
    want = math.exp(nll.item())
    assert want > 1000
    # 128 zero logits in a softmax over ~152k rows would move it by ~1e-3 (relative)
    assert abs(ours - want) / want <= 1e-5, (ours, want)
