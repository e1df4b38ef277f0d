"""Hugging Face model directories: export our model (`save_hf`), read the parts of one (config, tokenizer,
weights; a hub name through `fetch_hub_model`) for llm.tasks.source.ModelSource. Imports model and data only."""

from llm.hf.adapters import save_peft_dir
from llm.hf.files import (
    fetch_hub_model,
    is_hf_model_dir,
    load_hf_tokenizer,
    load_hf_weights,
    looks_like_hub_name,
    read_hf_config,
    save_hf,
)

__all__ = [
    "fetch_hub_model",
    "is_hf_model_dir",
    "load_hf_tokenizer",
    "load_hf_weights",
    "looks_like_hub_name",
    "read_hf_config",
    "save_hf",
    "save_peft_dir",
]
