"""Worker for tests/test_sft_train.py: the single-process SFT runs, then greedy decoding.

argv: OUT_DIR ITERS EVERY. OUT_DIR holds (from the test) small.tiktoken, train.jsonl, heldout.jsonl and
base/ (the 'pretrained' model as a megatron-core checkpoint, converted from base_hf/). Runs:
  mask   1 iteration, the whole training set as one micro-batch: the loss the trainer reports
  per-token  2 iterations of the whole set as one micro-batch, then as micro-batches of one sample
         with and without --calculate-per-token-loss (the step must not depend on the split)
  learn  ITERS iterations from the base (fresh optimizer), saved to sft_ckpt/ every EVERY
then greedy answers to the training prompts from sft_ckpt/ with megatron_qwen.inference, and
again with transformers after tools/convert_checkpoint.py mcore-to-hf, which also exports each
saved iteration for its held-out loss (transformers' logits). Writes OUT_DIR/result.json.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_common import MODEL_FLAGS, SEQ, hf_masked_loss  # noqa: E402

from megatron_qwen.config import load_config  # noqa: E402
from megatron_qwen.runtime import init_distributed  # noqa: E402
from megatron_qwen.training.config import PretrainConfig  # noqa: E402
from megatron_qwen.training.loop import train  # noqa: E402


def sft_flags(out: Path, tokenizer_vocab: int) -> list:
    return MODEL_FLAGS + [
        "--vocab-size", str(tokenizer_vocab), "--task", "sft", "--sft-data-path", str(out / "train.jsonl"),
        "--tokenizer-path", str(out / "small.tiktoken"), "--split", "100,0,0", "--num-workers", "0",
        "--pretrained-checkpoint", str(out / "base"), "--no-exit-signal-handler", "--log-interval", "1",
        "--lr", "3e-3", "--min-lr", "3e-3", "--lr-decay-style", "constant", "--lr-warmup-iters", "3",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "7", "--tensorboard-dir", "none",
        "--calculate-per-token-loss"]


def greedy_megatron(ckpt: Path, prompts: list, tok) -> list:
    from megatron_qwen.inference import SamplingParams, generate, load_model

    chunks, model_cfg = load_model(str(ckpt))
    outs = generate(chunks[0], prompts, SamplingParams(max_new_tokens=40),
                    stop_ids=[tok.im_end_id, tok.eod_id], vocab_size=model_cfg.vocab_size)
    return [tok.decode(o) for o in outs]


def greedy_hf(hf_dir: Path, prompts: list, tok) -> list:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    answers = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False,
                             eos_token_id=[tok.im_end_id, tok.eod_id], pad_token_id=tok.eod_id)
        new = out[0, len(p):].tolist()
        answers.append(tok.decode([t for t in new if t not in (tok.im_end_id, tok.eod_id)]))
    return answers


def main():
    out, iters, every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    from megatron_qwen.data.sft import SFTDataset
    from megatron_qwen.tokenizer import render_chatml_prompt
    from megatron_qwen.tokenizer.qwen import QwenTokenizer

    tok = QwenTokenizer(out / "small.tiktoken")
    flags = sft_flags(out, tok.vocab_size)
    samples = len(SFTDataset(out / "train.jsonl", tok, SEQ))
    result = {"samples": samples}

    # mask: every packed sample in one micro-batch, so the reported loss is the batch's token mean
    cfg = load_config(PretrainConfig, flags + ["--train-iters", "1", "--micro-batch-size", str(samples),
                                               "--global-batch-size", str(samples)])
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    result["mask_loss"] = train(cfg)[0]["lm_loss"]

    # per-token: the same global batch split into micro-batches of one packed sample, whose
    # assistant-token counts differ; iteration 2's loss shows iteration 1's update
    for name, split in {"one_micro_batch": ["--micro-batch-size", str(samples)],
                        "per_token": ["--micro-batch-size", "1"],
                        "mean_of_means": ["--micro-batch-size", "1", "--no-calculate-per-token-loss"]}.items():
        cfg = load_config(PretrainConfig, flags + ["--train-iters", "2", "--global-batch-size", str(samples)] + split)
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        rows = train(cfg)
        result[name] = {"loss": [r["lm_loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}

    # learn: micro-batches of one packed sample (several conversations each)
    cfg = load_config(PretrainConfig, flags + [
        "--train-iters", str(iters), "--micro-batch-size", "1", "--global-batch-size", str(samples),
        "--save", str(out / "sft_ckpt"), "--save-interval", str(every),
        "--metrics-file", str(out / "learn.jsonl")])
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    train(cfg)

    train_rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    prompts = [render_chatml_prompt(r["messages"][:-1], tok) for r in train_rows]
    result["expected"] = [r["messages"][-1]["content"] for r in train_rows]
    result["megatron_greedy"] = greedy_megatron(out / "sft_ckpt", prompts, tok)

    from megatron_qwen.checkpoint.cli import main as convert
    from transformers import AutoModelForCausalLM

    # held-out loss of every saved iteration (and the base), by transformers on the exported model
    heldout = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    result["heldout"] = {0: hf_masked_loss(AutoModelForCausalLM.from_pretrained(out / "base_hf"), heldout, tok)[0]}
    for it in range(every, iters + 1, every):
        hf = out / f"sft_hf_{it}"
        convert(["mcore-to-hf", "--mcore", str(out / "sft_ckpt" / f"iter_{it:07d}"), "--out", str(hf),
                 "--tokenizer", "none"])
        result["heldout"][it] = hf_masked_loss(AutoModelForCausalLM.from_pretrained(hf), heldout, tok)[0]
    result["hf_greedy"] = greedy_hf(out / f"sft_hf_{iters}", prompts, tok)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":  # dist_checkpointing spawns helper processes that re-import this file
    main()
