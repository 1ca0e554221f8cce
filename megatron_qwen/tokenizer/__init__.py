"""The Qwen tokenizer (tiktoken), ChatML rendering with loss masks, vocabulary extension."""

from megatron_qwen.tokenizer.chatml import (
    DEFAULT_SYSTEM_PROMPT,
    ChatMLError,
    RenderedChat,
    check_messages,
    render_chatml,
    render_chatml_prompt,
)
from megatron_qwen.tokenizer.qwen import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAT_STR,
    SPECIAL_TOKENS,
    QwenTokenizer,
    TokenizerError,
    load_tokenizer,
    read_tiktoken_ranks,
    write_tiktoken_ranks,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ChatMLError",
    "RenderedChat",
    "check_messages",
    "render_chatml",
    "render_chatml_prompt",
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "PAT_STR",
    "SPECIAL_TOKENS",
    "QwenTokenizer",
    "TokenizerError",
    "load_tokenizer",
    "read_tiktoken_ranks",
    "write_tiktoken_ranks",
]
