#!/usr/bin/env python
"""ReAct tool use (report section 3.4) with a Python function as the tool.

    python examples/react_tool_use.py                       # tiny random model + canned turns
    python examples/react_tool_use.py --load ckpt/qwen7b-chat --max-new-tokens 256

Part 1 drives the loop with the megatron-core model: each model turn is generated from the
ChatML conversation (the ReAct prompt as the user turn) and cut at "Observation:", the tool runs,
its result is appended, and the model continues. Without --load the model is a tiny random one,
so its text will not follow the format; the parser's verdict is printed.

Part 2 shows a complete exchange on CANNED MODEL TURNS (strings written here, not generated),
so the parse -> tool -> observation -> final answer path is visible end to end.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_qwen.inference.react import OBSERVATION, Tool, react_loop  # noqa: E402


def stdlib_module_summary(module: str) -> dict:
    """The tool: the first line of a standard-library module's docstring and its public names."""
    import importlib

    mod = importlib.import_module(module)
    doc = (mod.__doc__ or "").strip().splitlines()
    public = [n for n in dir(mod) if not n.startswith("_")]
    return {"module": module, "summary": doc[0] if doc else "", "public_names": len(public)}


TOOLS = [Tool(
    name="module_summary",
    human_name="Python module summary",
    description="Summarise a Python standard-library module: its docstring's first line and how "
                "many public names it has.",
    fn=stdlib_module_summary,
    parameters=[{"name": "module", "type": "string", "required": True,
                 "description": "module name, e.g. json"}],
)]
QUESTION = "What is the json module for, and how many public names does it have?"


def model_driven(load: str | None, max_new_tokens: int) -> None:
    import torch

    from megatron_qwen.config import ParallelConfig, load_model_config
    from megatron_qwen.inference.generation import SamplingParams, generate
    from megatron_qwen.inference.loading import load_model
    from megatron_qwen.tokenizer import load_tokenizer
    from megatron_qwen.tokenizer.chatml import render_chatml_prompt

    tok = load_tokenizer()
    if load:
        (model,), cfg = load_model(load)
    else:
        from megatron_qwen.model import build_model
        from megatron_qwen.runtime import init_distributed

        init_distributed(ParallelConfig(), seed=0)
        cfg = load_model_config("tiny")
        (model,) = build_model(cfg, ParallelConfig())
        model.eval()
        print("(no --load: a tiny RANDOM model; expect text that is not ReAct)")

    def model_turn(prompt: str, transcript: str) -> str:
        ids = render_chatml_prompt([{"role": "user", "content": prompt}], tok) + tok.encode(transcript)
        out = generate(model, [ids], SamplingParams(max_new_tokens=max_new_tokens),
                       stop_ids=[tok.im_end_id, tok.eod_id], vocab_size=cfg.vocab_size)[0]
        text = tok.decode(out)
        return text.split(OBSERVATION)[0]  # the tool, not the model, writes the observation

    with torch.no_grad():
        result = react_loop(QUESTION, TOOLS, model_turn, max_steps=3)
    print(result.transcript)
    print(f"-> answer: {result.answer!r}")


CANNED_TURNS = [
    "Thought: I should ask the module summary tool about json.\n"
    "Action: module_summary\n"
    'Action Input: {"module": "json"}\n',
    "Thought: I now know the final answer\n"
    "Final Answer: json encodes and decodes JSON (the summary line says so); see the observation "
    "for its number of public names.",
]


def canned() -> None:
    turns = iter(CANNED_TURNS)

    def model_turn(prompt: str, transcript: str) -> str:
        return next(turns)

    result = react_loop(QUESTION, TOOLS, model_turn)
    print(result.transcript)
    print(f"-> answer: {result.answer!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", help="megatron-core checkpoint of a chat model (default: tiny random)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest model turn, in tokens")
    args = p.parse_args()
    print("=" * 30, "part 1: the model writes the turns", "=" * 30)
    model_driven(args.load, args.max_new_tokens)
    print()
    print("=" * 30, "part 2: CANNED MODEL TURNS (written in this file, not generated)", "=" * 30)
    canned()


if __name__ == "__main__":
    main()
