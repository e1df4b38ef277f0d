"""Hugging Face model directories: export our model (`save_hf`), import Llama / GPT-2 ones (`load_hf`). Imports
model and data only."""

from llm.hf.files import is_hf_model_dir, load_hf, load_hf_tokenizer, load_hf_weights, read_hf_config, save_hf

__all__ = ["is_hf_model_dir", "load_hf", "load_hf_tokenizer", "load_hf_weights", "read_hf_config", "save_hf"]
