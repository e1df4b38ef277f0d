"""The model's configuration: every architecture choice of `gpt.py` as one checked dataclass.

Each field's default is today's model (RoPE, RMSNorm, SwiGLU, pre-norm); the options that imported families need
are off by default, so a config without them builds the same model bit for bit:
  qkv_bias                  biases on the query/key/value projections only (Qwen 2.5)
  qk_norm                   per-head RMSNorm on queries and keys before RoPE (OLMo 2, Qwen 3, Gemma 3)
  head_dim                  a head width other than d_model / n_head (Qwen 3, Gemma 3)
  sliding_window, sliding_layers, local_rope_theta
                            attention to the last `sliding_window` positions only, in every layer (Mistral) or in
                            the listed ones (Qwen with use_sliding_window, Gemma 3's 5 local : 1 global), those
                            layers optionally with their own unscaled RoPE base (Gemma 3)
  scale_embeddings, norm_unit_offset, mlp=geglu, post_norms, query_pre_attn_scalar, logit_softcap
                            Gemma: embedding x sqrt(D), RMSNorm weight applied as 1 + w, GELU-tanh gated MLP, a norm
                            after attention and after the MLP as well as before, attention scaled by
                            query_pre_attn_scalar^-1/2, tanh soft-capping of the final logits
  qk_norm_scope=projection, clip_qkv
                            OLMoE: the q/k norms over the whole projection (all heads at once), q/k/v clamped
  moe                       a mixture-of-experts feed-forward in some or all layers (`moe.py`, Mixtral, Qwen3-MoE,
                            OLMoE)
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from llm.errors import ConfigError, check_bool, check_choice, check_int, check_number
from llm.model.moe import parse_moe
from llm.model.rope import parse_scaling


@dataclass
class GPTConfig:
    vocab_size: int = 4096  # real tokenizer size; the embedding is padded up to `pad_vocab_to`
    n_layer: int = 4
    n_head: int = 6
    # no default: every model says (the presets do); None = n_head (multi-head), fewer = grouped-query attention.
    # A default of the tiny preset's 2 would turn any model built in code with another n_head into GQA.
    n_kv_head: int | None = field(kw_only=True)
    d_model: int = 192
    ffn_hidden: int | None = None  # None: 4*D for GELU, 8/3*D rounded up to a multiple of 64 if gated
    max_seq_len: int = 128  # the training context; learned positions cannot go past it
    pos_emb: str = "rope"  # rope | learned
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "swiglu"  # swiglu | gelu | geglu (GELU-tanh gated, Gemma)
    bias: bool = False  # biases in linear layers and LayerNorm
    qkv_bias: bool = False  # biases on the q/k/v projections even when `bias` is false (Qwen 2.5)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # length extrapolation (see llm/model/rope.py)
    init_std: float = 0.02
    pad_vocab_to: int = 64  # embedding rows rounded up to a multiple of this (faster matmuls; never in a softmax)
    tie_embeddings: bool = True  # the LM head is the token embedding; false: a separate matrix (imported models)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE (OLMo 2, Qwen 3, Gemma 3)
    head_dim: int | None = None  # width of one head; None: d_model / n_head
    sliding_window: int | None = None  # attend to the last this many positions (itself included); None: all
    sliding_layers: list[int] | None = None  # layers (0-based) that use the window; None: every layer
    local_rope_theta: float | None = None  # RoPE base of the sliding layers, unscaled; None: rope_theta + scaling
    scale_embeddings: bool = False  # token embedding multiplied by sqrt(d_model) (Gemma)
    norm_unit_offset: bool = False  # RMSNorm weight stored as w, applied as 1 + w, initialised 0 (Gemma)
    post_norms: bool = False  # also a norm on the attention and MLP outputs, before the residual add (Gemma 2/3)
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar^-1/2; None: head_dim^-1/2
    logit_softcap: float | None = None  # final logits -> c * tanh(logits / c) (Gemma 2/3's final_logit_softcapping)
    qk_norm_scope: str = "head"  # head: per head over hd | projection: over all of q and all of k (OLMoE)
    clip_qkv: float | None = None  # q, k and v clamped to [-c, c] after the projections and norms (OLMoE)
    moe: dict | None = None  # mixture-of-experts feed-forward (llm/model/moe.py); None: dense
    family: str | None = None  # the HF model_type an imported model came from, written back on export

    def __post_init__(self):
        for key in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "pad_vocab_to"):
            check_int(f"model.{key}", getattr(self, key), 1)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        check_int("model.n_kv_head", self.n_kv_head, 1)
        check_int("model.ffn_hidden", self.ffn_hidden, 1, allow_none=True)
        for key in ("bias", "qkv_bias", "qk_norm", "scale_embeddings", "norm_unit_offset", "post_norms"):
            check_bool(f"model.{key}", getattr(self, key))
        for key in ("local_rope_theta", "query_pre_attn_scalar", "logit_softcap", "clip_qkv"):
            check_number(f"model.{key}", getattr(self, key), 0, low_open=True, allow_none=True)
        if self.family is not None and not isinstance(self.family, str):
            raise ConfigError(f"model.family={self.family!r} must be a Hugging Face model_type or null")
        check_number("model.dropout", self.dropout, 0, 1, high_open=True)
        for key in ("norm_eps", "rope_theta", "init_std"):
            check_number(f"model.{key}", getattr(self, key), 0, low_open=True)
        check_choice("model.pos_emb", self.pos_emb, {"rope", "learned"})
        check_choice("model.norm", self.norm, {"rmsnorm", "layernorm"})
        check_choice("model.mlp", self.mlp, {"swiglu", "gelu", "geglu"})
        check_choice("model.qk_norm_scope", self.qk_norm_scope, {"head", "projection"})
        if self.qk_norm_scope == "projection" and not self.qk_norm:
            raise ConfigError("model.qk_norm_scope=projection needs model.qk_norm=true")
        self.moe = parse_moe(self.moe, self.n_layer)
        if self.moe is not None and self.mlp != "swiglu":
            raise ConfigError(f"model.moe needs model.mlp=swiglu (its experts are SwiGLU), not {self.mlp}")
        if self.norm_unit_offset and self.norm != "rmsnorm":
            raise ConfigError("model.norm_unit_offset=true needs model.norm=rmsnorm (it is Gemma's RMSNorm)")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(
                    f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head} "
                    f"(or set model.head_dim)"
                )
            self.head_dim = self.d_model // self.n_head
        check_int("model.head_dim", self.head_dim, 2)
        self._check_sliding()
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model if self.mlp == "gelu" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.rope_scaling is not None:  # checked with the rest of the config; kept parsed (defaults filled in)
            self.rope_scaling = parse_scaling(self.rope_scaling)

    def _check_sliding(self) -> None:
        check_int("model.sliding_window", self.sliding_window, 1, allow_none=True)
        if self.sliding_layers is not None:
            self.sliding_layers = list(self.sliding_layers)
            bad = [i for i in self.sliding_layers if not isinstance(i, int) or not 0 <= i < self.n_layer]
            if bad or len(set(self.sliding_layers)) != len(self.sliding_layers):
                raise ConfigError(
                    f"model.sliding_layers={self.sliding_layers} must list distinct layer indices in "
                    f"[0, {self.n_layer - 1}]" + (f" (not {bad[0]!r})" if bad else "")
                )
        if self.sliding_window is None:
            for key in ("sliding_layers", "local_rope_theta"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"model.{key} is set but model.sliding_window is null (no layer slides)")
        if self.local_rope_theta is not None and self.pos_emb != "rope":
            raise ConfigError("model.local_rope_theta needs model.pos_emb=rope")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends to the last sliding_window positions only."""
        return self.sliding_window is not None and (self.sliding_layers is None or layer in self.sliding_layers)

    def is_sparse(self, layer: int) -> bool:
        """Whether `layer`'s feed-forward is the mixture of experts (model.moe) rather than the dense MLP."""
        return self.moe is not None and (self.moe["layers"] is None or layer in self.moe["layers"])

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
    for f in fields(GPTConfig):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in kwargs:
            raise ConfigError(f"model.{f.name} is not set: {REQUIRED[f.name]}")
    return GPTConfig(**kwargs)


# The model options added after the first checkpoints, at their code defaults: the value that means "off" (what a
# checkpoint from before an option existed was trained with, and what an HF family that does not name the option
# requires). The presets turn some on by setting them (QK-norm).
OPTIONS_OFF = {
    f.name: f.default
    for f in fields(GPTConfig)
    if f.name
    in (
        "qkv_bias",
        "qk_norm",
        "sliding_window",
        "sliding_layers",
        "local_rope_theta",
        "scale_embeddings",
        "norm_unit_offset",
        "post_norms",
        "query_pre_attn_scalar",
        "logit_softcap",
        "qk_norm_scope",
        "clip_qkv",
        "moe",
    )
}

# the keys every model states (no default), and what to set them to
REQUIRED = {
    "n_kv_head": "null for as many key/value heads as model.n_head (multi-head attention), fewer for grouped-query "
    "attention (model.n_head must be divisible by it)"
}
