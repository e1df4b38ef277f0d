"""The transformer (`gpt.py`), its mixture-of-experts feed-forward (`moe.py`) and rotary position embeddings
(`rope.py`). Depends on torch only."""

from llm.model.config import OPTIONS_OFF, GPTConfig, gpt_config
from llm.model.generation import KVCache
from llm.model.gpt import GPT, build_gpt, flops_per_token
from llm.model.moe import router_terms, update_router_bias
from llm.model.sampling import left_padding_inputs, sample_next_token

__all__ = [
    "GPT",
    "GPTConfig",
    "KVCache",
    "OPTIONS_OFF",
    "build_gpt",
    "flops_per_token",
    "gpt_config",
    "left_padding_inputs",
    "router_terms",
    "sample_next_token",
    "update_router_bias",
    "unwrap_model",
]


def unwrap_model(model):
    """The plain GPT under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module"):
            model = model.module
        else:
            return model
