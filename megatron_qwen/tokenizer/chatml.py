"""ChatML rendering with a loss mask, shared by SFT, the reward model and PPO (report 3.1).

A conversation renders as Qwen's released ``make_context`` does: each turn is
``<|im_start|>`` + role + ``\\n`` + content + ``<|im_end|>``, turns joined by ``\\n``, with role,
newline and content encoded separately (so the ids match Qwen's SFT data exactly) and content
encoded with special tokens disallowed (data cannot inject ``<|im_end|>``).

The loss mask marks the tokens that are *targets*: the content of each assistant turn and its
``<|im_end|>``. The ``\\n`` after ``<|im_end|>`` is not a target: generation stops at
``<|im_end|>``, and the newline is template glue that the renderer adds itself. Everything of
system and user turns, and the ``<|im_start|>assistant\\n`` header, carries no loss.
"""

from __future__ import annotations

from typing import List, Mapping, NamedTuple, Optional, Sequence

from megatron_qwen.tokenizer.qwen import QwenTokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


class ChatMLError(ValueError):
    """A conversation that cannot be rendered; the message names the turn and field.

    ``reason`` is a short key for skip accounting: ``unknown_role`` or ``bad_message``."""

    def __init__(self, message: str, reason: str = "bad_message"):
        super().__init__(message)
        self.reason = reason


class RenderedChat(NamedTuple):
    ids: List[int]
    loss_mask: List[int]  # 1 where the token is a training target (assistant content + <|im_end|>)


def check_messages(messages: Sequence[Mapping]) -> None:
    """Raise ChatMLError naming the first malformed turn."""
    if not isinstance(messages, (list, tuple)):
        raise ChatMLError(f"messages must be a list of {{role, content}}, got {type(messages).__name__}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatMLError(f"message {i}: expected an object with role and content")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ChatMLError(
                f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})", "unknown_role"
            )
        if not isinstance(content, str):
            raise ChatMLError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ChatMLError(f"message {i}: a system turn may only come first")


def render_chatml(
    messages: Sequence[Mapping],
    tokenizer: QwenTokenizer,
    add_generation_prompt: bool = False,
    system: Optional[str] = DEFAULT_SYSTEM_PROMPT,
) -> RenderedChat:
    """Ids and loss mask of a conversation in ChatML.

    ``system`` is the system prompt used when the conversation has no system turn (None: add
    none). ``add_generation_prompt`` appends ``<|im_start|>assistant\\n`` for sampling.
    """
    check_messages(messages)
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    nl = tokenizer.encode("\n")
    ids: List[int] = []
    mask: List[int] = []
    for i, msg in enumerate(messages):
        if i:
            ids += nl
            mask += [0] * len(nl)
        header = [tokenizer.im_start_id] + tokenizer.encode(msg["role"]) + nl
        content = tokenizer.encode(msg["content"]) + [tokenizer.im_end_id]
        target = 1 if msg["role"] == "assistant" else 0
        ids += header + content
        mask += [0] * len(header) + [target] * len(content)
    if add_generation_prompt:
        prompt = ([] if not ids else nl) + [tokenizer.im_start_id] + tokenizer.encode("assistant") + nl
        ids += prompt
        mask += [0] * len(prompt)
    return RenderedChat(ids, mask)


def render_chatml_prompt(
    messages: Sequence[Mapping], tokenizer: QwenTokenizer, system: Optional[str] = DEFAULT_SYSTEM_PROMPT
) -> List[int]:
    """Ids of the prompt for generation: the conversation, then ``<|im_start|>assistant\\n``."""
    return render_chatml(messages, tokenizer, add_generation_prompt=True, system=system).ids
