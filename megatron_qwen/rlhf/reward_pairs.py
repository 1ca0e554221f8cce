"""The reward model's inputs: its tokenizer and its comparison pairs.

Reading, rendering, truncation and skip accounting are ``megatron_qwen.data.preference``'s;
this module only picks the tokenizer and turns the data module's report into the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_qwen.data.preference import PreferenceDataset
from megatron_qwen.tokenizer import load_tokenizer


def load_rm_tokenizer(tokenizer_path: Optional[str], model_path: Optional[str]):
    """An explicit tokenizer path, else the model directory's ``qwen.tiktoken``, else the packaged one."""
    if tokenizer_path:
        return load_tokenizer(tokenizer_path)
    if model_path and (Path(model_path) / "qwen.tiktoken").is_file():
        return load_tokenizer(model_path)
    return load_tokenizer()


def load_pairs(path, tokenizer, seq_length: int) -> PreferenceDataset:
    """Rendered pairs of one JSONL file (bad lines skipped and counted by the data module)."""
    return PreferenceDataset(str(path), tokenizer, seq_length)


def data_report(dataset: PreferenceDataset) -> dict:
    """What was read: usable pairs, truncated pairs, skipped lines per reason with places."""
    return {"pairs": len(dataset), "truncated": dataset.truncated, "skipped": dataset.skips.total,
            "skipped_by_reason": dict(dataset.skips.counts), "skipped_places": dataset.skips.places}
