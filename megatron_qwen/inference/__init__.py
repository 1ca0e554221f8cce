"""Inference on the megatron-core Qwen model: checkpoint loading with the long-context switches of
report section 2.5, generation with megatron-core's static KV cache, perplexity at several
lengths (Table 3), and ReAct tool-use prompts (section 3.4)."""

from megatron_qwen.inference.generation import SamplingParams, generate
from megatron_qwen.inference.loading import LongContext, load_model, set_long_context
from megatron_qwen.inference.react import ReActStep, Tool, build_react_prompt, parse_react

__all__ = [
    "LongContext",
    "ReActStep",
    "SamplingParams",
    "Tool",
    "build_react_prompt",
    "generate",
    "load_model",
    "parse_react",
    "set_long_context",
]
