"""The model's configuration: every architecture choice of `gpt.py` as one checked dataclass.

Each field's default is today's model (RoPE, RMSNorm, SwiGLU, pre-norm); the options that imported families need
(QK-norm, ...) are off by default, so a config without them builds the same model bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from llm.errors import ConfigError, check_bool, check_choice, check_int, check_number
from llm.model.rope import parse_scaling


@dataclass
class GPTConfig:
    vocab_size: int = 4096  # real tokenizer size; the embedding is padded up to `pad_vocab_to`
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (multi-head); fewer = grouped-query attention
    d_model: int = 256
    ffn_hidden: int | None = None  # None: 4*D for GELU, 8/3*D rounded up to a multiple of 64 for SwiGLU
    max_seq_len: int = 256  # the training context; learned positions cannot go past it
    pos_emb: str = "rope"  # rope | learned
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "swiglu"  # swiglu | gelu
    bias: bool = False  # biases in linear layers and LayerNorm
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # length extrapolation (see llm/model/rope.py)
    init_std: float = 0.02
    pad_vocab_to: int = 64  # embedding rows rounded up to a multiple of this (faster matmuls)
    tie_embeddings: bool = True  # the LM head is the token embedding; false: a separate matrix (imported models)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE (OLMo 2, Qwen 3, Gemma 3)

    def __post_init__(self):
        for key in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "pad_vocab_to"):
            check_int(f"model.{key}", getattr(self, key), 1)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        check_int("model.n_kv_head", self.n_kv_head, 1)
        check_int("model.ffn_hidden", self.ffn_hidden, 1, allow_none=True)
        check_bool("model.bias", self.bias)
        check_bool("model.qk_norm", self.qk_norm)
        check_number("model.dropout", self.dropout, 0, 1, high_open=True)
        for key in ("norm_eps", "rope_theta", "init_std"):
            check_number(f"model.{key}", getattr(self, key), 0, low_open=True)
        check_choice("model.pos_emb", self.pos_emb, {"rope", "learned"})
        check_choice("model.norm", self.norm, {"rmsnorm", "layernorm"})
        check_choice("model.mlp", self.mlp, {"swiglu", "gelu"})
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model if self.mlp == "gelu" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            parse_scaling(self.rope_scaling)  # the extrapolation keys, checked with the rest of the config

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return self.pad_vocab_to * math.ceil(self.vocab_size / self.pad_vocab_to)

    def to_dict(self) -> dict:
        return asdict(self)


def gpt_config(**kwargs) -> GPTConfig:
    """A checked GPTConfig from plain keyword arguments (unknown keys named), without building any weights."""
    known = GPTConfig.__dataclass_fields__
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(f"unknown model key(s) {unknown}; known keys: {sorted(known)}")
    return GPTConfig(**kwargs)
