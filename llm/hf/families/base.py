"""What every family module declares, and the Llama-shaped families that differ only by table entries.

A family is one Hugging Face `model_type`: its architecture class, the values of our model options it requires
(`needs`: anything else it cannot represent, named in one line), its config.json fields both ways, and its tensor
names. Llama, Mistral, Qwen 2 and Qwen 3 are our pre-norm RoPE / RMSNorm / SwiGLU block with q/k/v/o projections;
what sets them apart is which biases they carry, QK-norm, and how they declare sliding windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from llm.errors import ConfigError
from llm.hf.rope import legacy_rope, rope_from_hf, rope_to_hf
from llm.model import OPTIONS_OFF, GPTConfig

# Our model options with the value that means "off": a family that does not list an option in `frees` or set it
# in `needs` requires it off. (pos_emb / norm / mlp / bias are fixed per family the same way.)
OFF = {**{f.name: f.default for f in fields(GPTConfig) if f.name in ("pos_emb", "norm", "mlp", "bias")}, **OPTIONS_OFF}


def _shown(value) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    needs: dict = field(default_factory=dict)  # option -> the value this family requires (over OFF)
    frees: frozenset = frozenset()  # options this family represents at any value
    default_theta: float = 10000.0  # RoPE base when config.json has none
    fused_qkv: bool = False  # q/k/v in one tensor as ours (GPT-2's c_attn); else q_proj / k_proj / v_proj
    conv1d: bool = False  # linear weights stored [in, out] (GPT-2)

    def refusal(self, cfg: GPTConfig) -> str | None:
        """Why this family cannot represent `cfg` (one line naming the model key), or None when it can."""
        required = {**OFF, **self.needs}
        for key, value in required.items():
            if key not in self.frees and getattr(cfg, key) != value:
                return f"model.{key}={_shown(getattr(cfg, key))}: {self.architecture} needs model.{key}={_shown(value)}"
        return self.extra_refusal(cfg)

    def extra_refusal(self, cfg: GPTConfig) -> str | None:
        return None

    def check(self, hf: dict, key: str, ok: bool, what: str) -> None:
        """A config.json field we cannot represent: ConfigError naming it."""
        if not ok:
            raise ConfigError(f"config.json: {key}={hf.get(key)!r} is not supported for {self.model_type} ({what})")

    # The subclasses: config_from_hf(hf) -> our GPTConfig kwargs; config_to_hf(cfg) -> the family's fields;
    # top_names() / layer_names(i) -> our parameter names (without .weight/.bias) -> theirs.


@dataclass(frozen=True)
class LlamaLike(Family):
    """LlamaForCausalLM and its close relatives. `bias`: "all" (attention_bias + mlp_bias, as our model.bias), "qkv"
    (q/k/v always, nothing else: Qwen 2), "none"; `sliding`: "none", "all" (Mistral: every layer or none),
    "layers" (Qwen: layer_types, or use_sliding_window from max_window_layers on)."""

    bias: str = "none"
    sliding: str = "none"
    head_dim_field: bool = True  # config.json carries head_dim (Qwen 2 derives it from hidden_size)

    def extra_refusal(self, cfg: GPTConfig) -> str | None:
        if not self.head_dim_field and cfg.head_dim * cfg.n_head != cfg.d_model:
            return f"model.head_dim={cfg.head_dim}: {self.architecture} has head_dim = d_model / n_head"
        if self.sliding == "all" and cfg.sliding_layers not in (None, list(range(cfg.n_layer))):
            return f"model.sliding_layers={cfg.sliding_layers}: {self.architecture} slides in every layer or none"
        return None

    def config_from_hf(self, hf: dict) -> dict:
        self.check(hf, "hidden_act", hf.get("hidden_act", "silu") == "silu", "SwiGLU's silu only")
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        if self.bias == "all":
            self.check(
                hf,
                "mlp_bias",
                bool(hf.get("mlp_bias", False)) == attention_bias,
                f"the same as attention_bias={attention_bias}: biases on every linear layer or on q/k/v only",
            )
        else:
            self.check(hf, "attention_bias", not attention_bias, "an output-projection bias without MLP biases")
        theta, scaling, max_seq_len = rope_from_hf(hf, theta=self.default_theta)
        n_layer = hf["num_hidden_layers"]
        window, layers = self.sliding_from_hf(hf, n_layer)
        return {
            "pos_emb": "rope",
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "bias": attention_bias and self.bias == "all",
            "qkv_bias": self.bias == "qkv",
            "qk_norm": bool(self.needs.get("qk_norm", False)),
            **shape_from_hf(
                hf, n_layer, hf.get("head_dim") or d // heads, max_seq_len, (theta, scaling), (window, layers)
            ),
        }

    def sliding_from_hf(self, hf: dict, n_layer: int) -> tuple[int | None, list[int] | None]:
        """(sliding_window, sliding_layers) in our terms: None for a window that no layer uses; None layers = all."""
        if self.sliding == "none":
            return None, None
        window = hf.get("sliding_window")
        if self.sliding == "layers":
            window = window if hf.get("use_sliding_window") else None
            types = hf.get("layer_types") or [
                "sliding_attention" if i >= hf.get("max_window_layers", n_layer) else "full_attention"
                for i in range(n_layer)
            ]
            return sliding_layers(self, types, window, n_layer)
        return window, None

    def config_to_hf(self, cfg: GPTConfig) -> dict:
        rope, max_pos = rope_to_hf(cfg)
        out = {
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head,
            "hidden_act": "silu",
            "max_position_embeddings": max_pos,
            "rms_norm_eps": cfg.norm_eps,
            "attention_dropout": cfg.dropout,
            "rope_parameters": rope,
            "rope_theta": rope["rope_theta"],
            "rope_scaling": legacy_rope(rope),
        }
        if self.head_dim_field:
            out["head_dim"] = cfg.head_dim
        if self.bias == "all":
            out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
        elif self.bias == "none" and self.model_type != "mistral":
            out["attention_bias"] = False
        if self.sliding == "all":
            out["sliding_window"] = cfg.sliding_window
        elif self.sliding == "layers":
            types = layer_types(cfg)
            first = types.index("sliding_attention") if "sliding_attention" in types else cfg.n_layer
            out.update(
                use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window,
                max_window_layers=first,
                layer_types=types,
            )
        return out

    def top_names(self) -> dict[str, str]:
        return {"tok_emb": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head"}

    def layer_names(self, i: int) -> dict[str, str]:
        h = f"model.layers.{i}."
        return {
            "norm1": h + "input_layernorm",
            "norm2": h + "post_attention_layernorm",
            "attn.qkv": h + "self_attn.qkv",  # split into q_proj / k_proj / v_proj
            "attn.q_norm": h + "self_attn.q_norm",
            "attn.k_norm": h + "self_attn.k_norm",
            "attn.proj": h + "self_attn.o_proj",
            "mlp.gate": h + "mlp.gate_proj",
            "mlp.up": h + "mlp.up_proj",
            "mlp.down": h + "mlp.down_proj",
        }


def layer_types(cfg: GPTConfig) -> list[str]:
    """HF's per-layer attention kinds for our config."""
    return ["sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.n_layer)]


def shape_from_hf(hf: dict, n_layer: int, head_dim: int, max_seq_len: int, rope: tuple, sliding: tuple) -> dict:
    """The keys every Llama-like config.json gives the same way: sizes, norm eps, RoPE (theta, scaling) and the
    sliding window (window, layers)."""
    heads = hf["num_attention_heads"]
    return {
        "n_layer": n_layer,
        "n_head": heads,
        "n_kv_head": hf.get("num_key_value_heads") or heads,
        "d_model": hf["hidden_size"],
        "head_dim": head_dim,
        "ffn_hidden": hf["intermediate_size"],
        "max_seq_len": max_seq_len,
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": rope[0],
        "rope_scaling": rope[1],
        "sliding_window": sliding[0],
        "sliding_layers": sliding[1],
    }


def sliding_layers(family: Family, types: list, window, n_layer: int) -> tuple[int | None, list[int] | None]:
    """Our (sliding_window, sliding_layers) from HF's layer_types; unknown kinds are a ConfigError."""
    if len(types) != n_layer or set(types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(
            f"config.json: layer_types={types!r} is not supported for {family.model_type} "
            f"({n_layer} entries of 'sliding_attention' / 'full_attention')"
        )
    layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if window is None or not layers:
        return None, None
    return window, None if len(layers) == n_layer else layers


LLAMA = LlamaLike("llama", "LlamaForCausalLM", frees=frozenset({"bias"}), bias="all")
MISTRAL = LlamaLike(
    "mistral", "MistralForCausalLM", frees=frozenset({"sliding_window", "sliding_layers"}), sliding="all"
)
QWEN2 = LlamaLike(
    "qwen2",
    "Qwen2ForCausalLM",
    needs={"qkv_bias": True},
    frees=frozenset({"sliding_window", "sliding_layers"}),
    bias="qkv",
    sliding="layers",
    head_dim_field=False,
)
QWEN3 = LlamaLike(
    "qwen3",
    "Qwen3ForCausalLM",
    needs={"qk_norm": True},
    frees=frozenset({"sliding_window", "sliding_layers"}),
    sliding="layers",
)
