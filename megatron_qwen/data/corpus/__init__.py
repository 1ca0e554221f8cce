"""Corpus tools' logic: JSONL reading and the shared runner, HTML extraction + language id,
quality filters, decontamination, tokenization to megatron-core indexed datasets (and, by the
dedup modules, exact and MinHash dedup). The command-line front ends are in ``tools/``."""
