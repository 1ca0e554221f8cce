"""Worker for test_inference.py under torchrun (2 gloo processes): perplexity with TP=2 and with
PP=2, with and without the long-context techniques, and greedy generation with TP=2 and the KV
cache. Rank 0 prints one JSON line per layout, prefixed RESULT, for the test to compare with
its single-process numbers.

    torchrun --nproc-per-node 2 tests/scripts/inference_parallel.py CKPT DATA
"""

import json
import os
import sys

import torch

from megatron_qwen.config import ParallelConfig
from megatron_qwen.inference import perplexity as ppl
from megatron_qwen.inference.generation import SamplingParams, generate
from megatron_qwen.inference.loading import LongContext, load_model, set_long_context
from megatron_qwen.runtime import destroy, init_distributed
from megatron_qwen.tokenizer import load_tokenizer

ALL_ON = LongContext(True, True, "uniform:32")
PROMPTS = [[9707, 11, 1879], [785, 13027, 4128, 374, 264]]


def measure(ckpt: str, samples: dict, layout: ParallelConfig, with_generation: bool) -> dict:
    init_distributed(layout, seed=1)  # keeps the process group, rebuilds the model-parallel groups
    chunks, cfg = load_model(ckpt, layout)
    out = {"plain_64": ppl.perplexity(chunks, samples[64])}
    set_long_context(chunks, ALL_ON)
    out["all_128"] = ppl.perplexity(chunks, samples[128])
    set_long_context(chunks, LongContext())
    if with_generation:
        out["greedy"] = generate(chunks[0], PROMPTS, SamplingParams(max_new_tokens=6),
                                 vocab_size=cfg.vocab_size)
    return out


def main() -> None:
    ckpt, data = sys.argv[1:3]
    tok = load_tokenizer()
    docs = ppl.load_documents(data, tok, log=lambda m: None)
    samples = {n: ppl.make_samples(docs, n, 2, "concat", tok.eod_id) for n in (64, 128)}
    results = {
        "tp2": measure(ckpt, samples, ParallelConfig(tensor_model_parallel_size=2), True),
        "pp2": measure(ckpt, samples, ParallelConfig(pipeline_model_parallel_size=2), False),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(results), flush=True)
    destroy()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
