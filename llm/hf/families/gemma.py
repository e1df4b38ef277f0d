"""Gemma 3 (text): `Gemma3ForCausalLM`, model_type gemma3_text.

Our block with every Gemma option on: embedding x sqrt(D), RMSNorm applied as 1 + w, GELU-tanh gated MLP, QK-norm,
a norm before and after both attention and MLP, attention scaled by query_pre_attn_scalar^-1/2, sliding-window
layers (5 local : 1 global by default) whose RoPE has its own base, and optional soft-capping of the final logits.
Its config.json holds RoPE per layer type (`rope_parameters.full_attention` / `.sliding_attention`; 4.x:
rope_theta, rope_scaling and rope_local_base_freq). `attn_logit_softcapping` is Gemma 2's: transformers reads it
for Gemma 3 but never applies it, and neither do we.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm.hf.families.base import LlamaLike, layer_types, shape_from_hf, sliding_layers
from llm.hf.rope import rope_from_hf, rope_to_hf
from llm.model import GPTConfig

GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # HF's names for the tanh approximation we use


def _int_if_whole(value):
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True)
class Gemma3(LlamaLike):
    def extra_refusal(self, cfg: GPTConfig) -> str | None:
        return None

    def config_from_hf(self, hf: dict) -> dict:
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        self.check(hf, "hidden_activation", act in GELU_TANH, f"GELU with the tanh approximation: {list(GELU_TANH)}")
        self.check(hf, "attention_bias", not hf.get("attention_bias"), "an output-projection bias")
        self.check(hf, "use_bidirectional_attention", not hf.get("use_bidirectional_attention"), "causal only")
        n_layer = hf["num_hidden_layers"]
        head_dim = hf.get("head_dim") or 256  # transformers' default for Gemma 3
        params = hf.get("rope_parameters") or {}
        if "full_attention" in params:  # transformers 5: per layer type
            full, local = params["full_attention"], params.get("sliding_attention") or {}
        else:  # 4.x: rope_scaling for the global layers, rope_local_base_freq for the local ones
            full = dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta") or 1e6)
            local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq") or 10000.0}
        theta, scaling, max_seq_len = rope_from_hf(hf, full, 1e6, "rope_parameters.full_attention")
        local_theta, local_scaling, _ = rope_from_hf(hf, local, 10000.0, "rope_parameters.sliding_attention")
        self.check(
            hf,
            "rope_parameters",
            local_scaling is None or (local_theta, local_scaling) == (theta, scaling),
            "the sliding layers' RoPE must be plain (rope_type default) or the same as the global layers'",
        )
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6  # 4.x configs
        types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)
        ]
        window, layers = sliding_layers(self, types, hf.get("sliding_window"), n_layer)
        scalar = hf.get("query_pre_attn_scalar", 256)
        return {
            "pos_emb": "rope",
            "norm": "rmsnorm",
            "mlp": "geglu",
            "bias": False,
            "qk_norm": True,
            "scale_embeddings": True,
            "norm_unit_offset": True,
            "post_norms": True,
            **shape_from_hf(hf, n_layer, head_dim, max_seq_len, (theta, scaling), (window, layers)),
            "local_rope_theta": None if window is None or local_scaling is not None else local_theta,
            "query_pre_attn_scalar": None if scalar == head_dim else scalar,
            "logit_softcap": hf.get("final_logit_softcapping"),
        }

    def config_to_hf(self, cfg: GPTConfig) -> dict:
        rope, max_pos = rope_to_hf(cfg)
        local = rope if cfg.local_rope_theta is None else {"rope_type": "default", "rope_theta": cfg.local_rope_theta}
        return {
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": max_pos,
            "rms_norm_eps": cfg.norm_eps,
            "attention_bias": False,
            "attention_dropout": cfg.dropout,
            "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),  # an int field there
            "rope_parameters": {"full_attention": rope, "sliding_attention": local},
            "sliding_window": cfg.sliding_window or max_pos,  # a window no layer uses when none slides
            "layer_types": layer_types(cfg),
            "attn_logit_softcapping": None,
            "final_logit_softcapping": cfg.logit_softcap,
            "use_bidirectional_attention": False,
        }

    def layer_names(self, i: int) -> dict[str, str]:
        h = f"model.layers.{i}."
        return {
            **super().layer_names(i),
            "post_attn_norm": h + "post_attention_layernorm",  # Gemma's names: a norm on each side of both
            "norm2": h + "pre_feedforward_layernorm",
            "post_mlp_norm": h + "post_feedforward_layernorm",
        }


GEMMA3 = Gemma3(
    "gemma3_text",
    "Gemma3ForCausalLM",
    needs={"mlp": "geglu", "qk_norm": True, "scale_embeddings": True, "norm_unit_offset": True, "post_norms": True},
    frees=frozenset(
        {
            "sliding_window",
            "sliding_layers",
            "local_rope_theta",
            "query_pre_attn_scalar",
            "logit_softcap",
        }
    ),
    default_theta=1e6,
)
