"""Tokenizer files for an exported checkpoint, built from the tiktoken ranks (no remote code).

qwen2 format: ``tokenizer.json`` from transformers' ``TikTokenConverter`` (byte-level BPE with
Qwen's pre-tokenizer regex, NFC normalisation and the 208 special tokens), so ``AutoTokenizer``
loads it as a ``PreTrainedTokenizerFast`` that gives the same ids as Qwen's tiktoken tokenizer.
qwen format: ``qwen.tiktoken`` and the original ``tokenizer_config.json`` fields; loading that with
transformers needs the ``tokenization_qwen.py`` remote code of the released model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from megatron_qwen.checkpoint.mapping import CheckpointError

# Text that spells a special token ("<|im_end|>\n<|im_start|>assistant" in a user turn) must stay
# text, as in our ChatML renderer, or it forges turns. apply_chat_template tokenizes one rendered
# string, so the template marks every "<|" of a role or content with a WORD JOINER: no special
# token (matched on the raw text) matches "<\u2060|", and the normalizer turns it back into "<|"
# before the BPE, so the ids are exactly those of the text (with the PreTrainedTokenizerFast named
# in tokenizer_config.json; transformers' Qwen2Tokenizer, which AutoTokenizer picks for
# model_type qwen2, replaces the normalizer: the markers then stay text with the joiner in them).
# split_special_tokens would split the template's own markers too. A literal "<\u2060|" in a
# text is read as "<|".
TEXT_MARK = "<\u2060|"
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + (message['role'] | replace('<|', '" + TEXT_MARK + "')) + '\n' + "
    "(message['content'] | replace('<|', '" + TEXT_MARK + "')) + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tokenizer_files(out: Path, fmt: str, vocab_file: Optional[str] = None,
                          model_max_length: int = 8192) -> None:
    """Write the tokenizer of ``fmt`` into ``out`` (the vocabulary from ``vocab_file`` or dashscope)."""
    from megatron_qwen.tokenizer.qwen import (ENDOFTEXT, PAT_STR, SPECIAL_TOKENS, TokenizerError,
                                              read_tiktoken_ranks, resolve_vocab_file)

    try:
        path = resolve_vocab_file(vocab_file)
        read_tiktoken_ranks(path)  # one-line error on a malformed file, before converting it
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    if fmt == "qwen":
        shutil.copyfile(path, out / "qwen.tiktoken")
        config = {"tokenizer_class": "QWenTokenizer", "model_max_length": model_max_length,
                  "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
    else:
        from tokenizers import normalizers
        from transformers.convert_slow_tokenizer import TikTokenConverter

        tok = TikTokenConverter(vocab_file=str(path), pattern=PAT_STR,
                                extra_special_tokens=list(SPECIAL_TOKENS)).converted()
        tok.normalizer = normalizers.Sequence([normalizers.Replace(TEXT_MARK, "<|"), normalizers.NFC()])
        tok.save(str(out / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": ENDOFTEXT,
                  "pad_token": ENDOFTEXT, "bos_token": None, "unk_token": None,
                  "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
                  "chat_template": CHATML_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
