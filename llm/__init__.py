"""`llm`: train GPT-style language models from scratch — pretraining, SFT and DPO — composed with Hydra."""

__version__ = "0.1.0"
