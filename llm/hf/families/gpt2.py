"""GPT-2: `GPT2LMHeadModel`, our learned positions / LayerNorm / GELU (tanh) block with biases everywhere. Its
linear layers are Conv1D (weights stored [in, out]) and q/k/v stay fused in `c_attn`."""

from __future__ import annotations

from dataclasses import dataclass

from llm.hf.families.base import Family
from llm.hf.families.gemma import GELU_TANH
from llm.model import GPTConfig

ARCH = {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}


@dataclass(frozen=True)
class GPT2(Family):
    def extra_refusal(self, cfg: GPTConfig) -> str | None:
        if cfg.n_kv_head != cfg.n_head:
            return (
                f"model.n_kv_head={cfg.n_kv_head}: GPT2LMHeadModel has no grouped-query attention "
                f"(needs model.n_kv_head = model.n_head = {cfg.n_head})"
            )
        if cfg.head_dim * cfg.n_head != cfg.d_model:
            return f"model.head_dim={cfg.head_dim}: GPT2LMHeadModel has head_dim = d_model / n_head"
        return None

    def config_from_hf(self, hf: dict) -> dict:
        self.check(
            hf,
            "activation_function",
            hf.get("activation_function", "gelu_new") in GELU_TANH,
            f"GELU with the tanh approximation only: {list(GELU_TANH)}",
        )
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            self.check(hf, key, not hf.get(key), "false only")
        self.check(hf, "scale_attn_weights", hf.get("scale_attn_weights", True), "true only")
        d = hf.get("n_embd", 768)
        return {
            **ARCH,
            "n_layer": hf.get("n_layer", 12),
            "n_head": hf.get("n_head", 12),
            "n_kv_head": hf.get("n_head", 12),
            "d_model": d,
            "ffn_hidden": hf.get("n_inner") or 4 * d,
            "max_seq_len": hf.get("n_positions", 1024),
            "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        }

    def config_to_hf(self, cfg: GPTConfig) -> dict:
        return {
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "n_inner": cfg.ffn_hidden,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True,
        }

    def top_names(self) -> dict[str, str]:
        return {
            "tok_emb": "transformer.wte",
            "pos_emb": "transformer.wpe",
            "norm_f": "transformer.ln_f",
            "lm_head": "lm_head",
        }

    def layer_names(self, i: int) -> dict[str, str]:
        h = f"transformer.h.{i}."
        return {
            "norm1": h + "ln_1",
            "norm2": h + "ln_2",
            "attn.qkv": h + "attn.c_attn",
            "attn.proj": h + "attn.c_proj",
            "mlp.up": h + "mlp.c_fc",
            "mlp.down": h + "mlp.c_proj",
        }


GPT2_FAMILY = GPT2("gpt2", "GPT2LMHeadModel", needs=ARCH, fused_qkv=True, conv1d=True)
