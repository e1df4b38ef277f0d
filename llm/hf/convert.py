"""Our GPT <-> Hugging Face transformers, as plain dicts: the config.json of `LlamaForCausalLM` / `GPT2LMHeadModel`
and the tensor names of their safetensors, both ways. No transformers import: the files are the interface.

Llama is our RoPE / RMSNorm / SwiGLU model (grouped-query attention included), GPT-2 our learned positions /
LayerNorm / GELU (tanh) with biases. Both share our pre-norm block and rotate-half RoPE layout, so the mapping is
names, the fused qkv split in three, GPT-2's transposed Conv1D weights, and the embedding cut to the real
vocabulary (ours is padded). RoPE scaling is written twice, so that both generations of transformers apply exactly
ours: `rope_parameters` (5.x) and `rope_scaling` + `rope_theta` (4.x).
"""

from __future__ import annotations

import math

import torch

from llm.errors import ConfigError
from llm.model import GPT, GPTConfig
from llm.model.rope import ntk_theta, parse_scaling

LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
GPT2 = {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # HF's names for the tanh approximation we use


def family(cfg: GPTConfig) -> str:
    """'llama' or 'gpt2': the HF architecture that represents this model, else ConfigError naming the model key."""
    arch = {key: getattr(cfg, key) for key in LLAMA}
    if cfg.qk_norm:
        raise ConfigError("model.qk_norm=true: LlamaForCausalLM and GPT2LMHeadModel do not normalise queries and keys")
    if arch == LLAMA:
        return "llama"
    if arch == GPT2:
        if cfg.n_kv_head != cfg.n_head:
            raise ConfigError(
                f"model.n_kv_head={cfg.n_kv_head}: GPT2LMHeadModel has no grouped-query attention "
                f"(needs model.n_kv_head = model.n_head = {cfg.n_head})"
            )
        if not cfg.bias:
            raise ConfigError(
                "model.bias=false: GPT2LMHeadModel always has biases (learned positions, LayerNorm, "
                "GELU export as GPT-2 only with model.bias=true)"
            )
        return "gpt2"
    shown = ", ".join(f"model.{k}={v}" for k, v in arch.items())
    raise ConfigError(
        f"{shown}: no Hugging Face architecture represents this combination "
        f"(LlamaForCausalLM: rope/rmsnorm/swiglu, GPT2LMHeadModel: learned/layernorm/gelu)"
    )


# ---------------------------------------------------------------------------------------------- RoPE scaling
def rope_to_hf(cfg: GPTConfig) -> tuple[dict, int]:
    """(rope_parameters of transformers 5, max_position_embeddings) that make HF rotate exactly as we do.

    HF's dynamic NTK takes the original context from max_position_embeddings, and its YaRN (in 4.x always, in 5.x
    without `factor`) derives the factor as max_position_embeddings / original_max_position_embeddings: both are
    set so that every version computes our frequencies. Static NTK is plain RoPE with the scaled base."""
    s = parse_scaling(cfg.rope_scaling)
    kind, theta = s["type"], float(cfg.rope_theta)
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}, cfg.max_seq_len
    factor, original = s["factor"], s.get("original_max_position_embeddings") or cfg.max_seq_len
    limit = math.ceil(factor * original)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}, limit
    if kind == "ntk" and not s["dynamic"]:
        return {"rope_type": "default", "rope_theta": ntk_theta(cfg.head_dim, theta, factor)}, limit
    if kind == "ntk":
        return {"rope_type": "dynamic", "factor": factor, "rope_theta": theta}, original
    if factor * original != limit:
        raise ConfigError(
            f"extrapolation.factor={factor} x extrapolation.original_max_position_embeddings={original}"
            f" is not a whole number of positions; transformers 4.x derives YaRN's factor from it"
        )
    params = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": float(s["beta_fast"]),
        "beta_slow": float(s["beta_slow"]),
        "truncate": s["truncate"],
        "rope_theta": theta,
    }
    if s["attention_factor"] is not None:
        params["attention_factor"] = s["attention_factor"]
    return params, limit


def rope_from_hf(hf: dict) -> tuple[float, dict | None, int]:
    """(rope_theta, our rope_scaling or None, our max_seq_len = the training context) from a Llama config.json
    in either format; a rope type or option we lack is a ConfigError naming the field."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    kind = params.pop("rope_type", params.pop("type", "default"))
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    max_pos = int(hf.get("max_position_embeddings", 2048))
    known = {
        "default": set(),
        "linear": {"factor"},
        "dynamic": {"factor"},
        "yarn": {
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "truncate",
        },
    }
    if kind not in known:
        raise ConfigError(
            f"config.json: rope_parameters.rope_type={kind!r} is not supported; supported: {sorted(known)}"
        )
    unknown = sorted(k for k, v in params.items() if k not in known[kind] and v is not None)
    if params.get("partial_rotary_factor", 1.0) == 1.0 and "partial_rotary_factor" in unknown:
        unknown.remove("partial_rotary_factor")  # 1.0: the whole head rotates, as ours does
    if unknown:
        raise ConfigError(f"config.json: rope_parameters.{unknown[0]} is not supported for rope_type={kind!r}")
    if kind == "default":
        return theta, None, max_pos
    factor = float(params.get("factor") or 1.0)
    if kind == "linear":
        original = max(1, round(max_pos / factor))
        return theta, {"type": "linear", "factor": factor, "original_max_position_embeddings": original}, original
    if kind == "dynamic":
        return (
            theta,
            {"type": "ntk", "dynamic": True, "factor": factor, "original_max_position_embeddings": max_pos},
            max_pos,
        )
    original = int(params.get("original_max_position_embeddings") or max_pos)
    if params.get("factor") is None:
        factor = max_pos / original
    scaling = {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": params.get("beta_fast") or 32,
        "beta_slow": params.get("beta_slow") or 1,
        "attention_factor": params.get("attention_factor"),
        "truncate": params.get("truncate", True),
    }
    return theta, scaling, original


# ---------------------------------------------------------------------------------------------- config.json
def config_to_hf(cfg: GPTConfig, dtype: str, special: dict) -> dict:
    """config.json for our model: `special` holds bos/eos/pad token ids."""
    kind = family(cfg)
    common = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
        **special,
    }  # torch_dtype: the 4.x name
    if kind == "gpt2":
        return {
            **common,
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
    rope, max_pos = rope_to_hf(cfg)
    legacy = (
        None
        if rope["rope_type"] == "default"
        else {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_theta"}}
    )
    return {
        **common,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": legacy,
    }


def _require(hf: dict, field: str, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"config.json: {field}={hf.get(field)!r} is not supported ({what})")


def config_from_hf(hf: dict) -> dict:
    """Our GPTConfig keyword arguments (rope_scaling included) from an HF config.json of Llama or GPT-2."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConfigError(f"config.json: model_type={kind!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    vocab = hf.get("vocab_size")
    common = {
        "vocab_size": vocab,
        "pad_vocab_to": 1,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "init_std": hf.get("initializer_range", 0.02),
        "dropout": 0.0,
    }  # pad_vocab_to 1: HF's rows exactly
    if kind == "gpt2":
        _require(
            hf,
            "activation_function",
            hf.get("activation_function", "gelu_new") in GELU_TANH,
            f"GELU with the tanh approximation only: {list(GELU_TANH)}",
        )
        _require(hf, "scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx"), "false only")
        _require(hf, "scale_attn_weights", hf.get("scale_attn_weights", True), "true only")
        _require(hf, "add_cross_attention", not hf.get("add_cross_attention"), "false only")
        d = hf.get("n_embd", 768)
        return {
            **common,
            **GPT2,
            "bias": True,
            "n_layer": hf.get("n_layer", 12),
            "n_head": hf.get("n_head", 12),
            "n_kv_head": hf.get("n_head", 12),
            "d_model": d,
            "ffn_hidden": hf.get("n_inner") or 4 * d,
            "max_seq_len": hf.get("n_positions", 1024),
            "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        }
    _require(hf, "hidden_act", hf.get("hidden_act", "silu") == "silu", "SwiGLU's silu only")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    _require(
        hf,
        "head_dim",
        hf.get("head_dim") in (None, d // heads),
        f"hidden_size / num_attention_heads = {d // heads} only",
    )
    bias = bool(hf.get("attention_bias", False))
    _require(
        hf,
        "mlp_bias",
        bool(hf.get("mlp_bias", False)) == bias,
        f"the same as attention_bias={bias}: our model has biases on every linear layer or on none",
    )
    theta, scaling, max_seq_len = rope_from_hf(hf)
    return {
        **common,
        **LLAMA,
        "bias": bias,
        "n_layer": hf["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": hf.get("num_key_value_heads") or heads,
        "d_model": d,
        "ffn_hidden": hf["intermediate_size"],
        "max_seq_len": max_seq_len,
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": theta,
        "rope_scaling": scaling,
    }


# ---------------------------------------------------------------------------------------------- tensors
def _layer_names(kind: str, i: int) -> dict[str, str]:
    """Our per-layer parameter names -> HF's (the fused qkv is handled apart)."""
    if kind == "gpt2":
        h = f"transformer.h.{i}."
        return {
            "norm1": h + "ln_1",
            "norm2": h + "ln_2",
            "attn.qkv": h + "attn.c_attn",
            "attn.proj": h + "attn.c_proj",
            "mlp.up": h + "mlp.c_fc",
            "mlp.down": h + "mlp.c_proj",
        }
    h = f"model.layers.{i}."
    return {
        "norm1": h + "input_layernorm",
        "norm2": h + "post_attention_layernorm",
        "attn.proj": h + "self_attn.o_proj",
        "mlp.gate": h + "mlp.gate_proj",
        "mlp.up": h + "mlp.up_proj",
        "mlp.down": h + "mlp.down_proj",
    }


def _top_names(kind: str) -> dict[str, str]:
    if kind == "gpt2":
        return {
            "tok_emb": "transformer.wte",
            "pos_emb": "transformer.wpe",
            "norm_f": "transformer.ln_f",
            "lm_head": "lm_head",
        }
    return {"tok_emb": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head"}


def name_map(cfg: GPTConfig) -> dict[str, str]:
    """Every parameter name of ours -> its HF name (the fused qkv maps to GPT-2's c_attn; for Llama to a prefix
    that `to_hf` splits into q_proj / k_proj / v_proj)."""
    kind = family(cfg)
    out = {}
    for ours, theirs in _top_names(kind).items():
        out[f"{ours}.weight"] = f"{theirs}.weight"
        out[f"{ours}.bias"] = f"{theirs}.bias"
    for i in range(cfg.n_layer):
        names = _layer_names(kind, i)
        if kind == "llama":
            names["attn.qkv"] = f"model.layers.{i}.self_attn.qkv"
        for ours, theirs in names.items():
            out[f"blocks.{i}.{ours}.weight"] = f"{theirs}.weight"
            out[f"blocks.{i}.{ours}.bias"] = f"{theirs}.bias"
    return out


def _conv1d(kind: str, ours: str) -> bool:  # GPT-2's Conv1D stores linear weights as [in, out]
    return kind == "gpt2" and ours.startswith("blocks.") and ours.endswith(".weight") and ".norm" not in ours


def to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names (embedding and untied head cut to the vocabulary; tied head left out)."""
    cfg, kind, names = model.config, family(model.config), name_map(model.config)
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {}
    for ours, tensor in model.state_dict().items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor = tensor.detach()
        if ours.startswith(("tok_emb.", "lm_head.")):
            tensor = tensor[: cfg.vocab_size]
        theirs = names[ours]
        if _conv1d(kind, ours):
            tensor = tensor.t()
        if kind == "llama" and ".self_attn.qkv." in theirs:
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv], dim=0)):
                out[theirs.replace("qkv", part)] = piece.contiguous().clone()
            continue
        out[theirs] = tensor.contiguous().clone()
    return out


def from_hf(model: GPT, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy HF tensors into our model in place (the padded embedding rows keep their values); a missing or unused
    tensor is a ConfigError naming it and `where`."""
    cfg, kind = model.config, family(model.config)
    base = "transformer." if kind == "gpt2" else "model."
    tensors = {
        (k if k.startswith((base, "lm_head.")) else base + k): v
        for k, v in tensors.items()
        if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
    }  # old buffers
    if kind == "llama":  # fuse q/k/v into our qkv
        for i in range(cfg.n_layer):
            h = f"model.layers.{i}.self_attn."
            for suffix in ("weight", "bias"):
                parts = [tensors.pop(f"{h}{p}_proj.{suffix}", None) for p in ("q", "k", "v")]
                if all(p is not None for p in parts):
                    tensors[f"{h}qkv.{suffix}"] = torch.cat(parts, dim=0)
                elif any(p is not None for p in parts):
                    raise ConfigError(f"{where}: layer {i} has biases on only some of q/k/v_proj; not supported")
    names = name_map(cfg)
    params = model.state_dict()
    with torch.no_grad():
        for ours, target in params.items():
            if ours == "lm_head.weight" and cfg.tie_embeddings:
                continue
            theirs = names[ours]
            if theirs not in tensors:
                raise ConfigError(f"{where}: tensor {theirs!r} is missing")
            tensor = tensors.pop(theirs)
            if _conv1d(kind, ours):
                tensor = tensor.t()
            rows = tensor.size(0) if ours.startswith(("tok_emb.", "lm_head.")) else target.size(0)
            if tuple(tensor.shape) != (rows, *target.shape[1:]) or rows > target.size(0):
                raise ConfigError(
                    f"{where}: tensor {theirs!r} has shape {tuple(tensor.shape)}, the config says {tuple(target.shape)}"
                )
            target[:rows].copy_(tensor)
    tensors.pop("lm_head.weight", None)  # a tied head saved anyway
    if tensors:
        raise ConfigError(
            f"{where}: tensor(s) {sorted(tensors)[:3]} have no place in {ARCHITECTURES[kind]} "
            f"as we read it (biases where the config has none?)"
        )
