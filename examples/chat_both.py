#!/usr/bin/env python
"""Chat once through tools/generate.py (megatron-core) and once through transformers; compare.

    python examples/chat_both.py --mcore CKPT_DIR --hf HF_DIR [--prompts prompts.jsonl] --out chat.json

Both decode greedily and stop at <|im_end|>, so a correct conversion gives the same answer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcore", required=True, help="megatron-core checkpoint directory")
    p.add_argument("--hf", required=True, help="the same model in Hugging Face (qwen2) format")
    p.add_argument("--prompts", help="JSONL of {'messages': [...]}; default: one built-in question")
    p.add_argument("--max-new-tokens", type=int, default=24, help="longest answer, in tokens (both sides)")
    p.add_argument("--out", type=Path, required=True, help="JSON with both answers and whether they match")
    args = p.parse_args()

    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            messages = json.loads(f.readline())["messages"]
    else:
        messages = [{"role": "user", "content": "What is the first sentence of the Python documentation topic 'for'?"}]

    # 1. megatron-core, through the documented command-line tool.
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        inp.write_text(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), "--load", args.mcore, "--input", str(inp),
                        "--output", str(outp), "--max-new-tokens", str(args.max_new_tokens)], check=True, cwd=REPO)
        mcore_answer = json.loads(outp.read_text().splitlines()[0])["response"]

    # 2. transformers, with the tokenizer and chat template the converter exported.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.hf)
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    chat = [{"role": "system", "content": "You are a helpful assistant."}] + messages
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, eos_token_id=im_end, pad_token_id=im_end)
    hf_answer = tok.decode([t for t in out[0, ids.shape[1]:].tolist() if t != im_end])

    result = {"messages": messages, "megatron_core": mcore_answer, "transformers": hf_answer,
              "same": mcore_answer == hf_answer}
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if not result["same"]:
        raise SystemExit("chat_both: the two answers differ")


if __name__ == "__main__":
    main()
