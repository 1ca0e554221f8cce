"""Data: corpus tools' logic (``corpus/``), the pretraining blend, SFT conversations
(``sft``), preference pairs (``preference``), and small real texts for demos and tests."""
