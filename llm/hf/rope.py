"""RoPE fields of a Hugging Face config.json <-> our `rope_theta` + `rope_scaling`, both ways.

Written twice, so that both generations of transformers apply exactly ours: `rope_parameters` (5.x) and
`rope_scaling` + `rope_theta` (4.x). Read from either. A rope type or option we lack is a ConfigError naming it.
"""

from __future__ import annotations

import math

from llm.errors import ConfigError
from llm.model import GPTConfig
from llm.model.rope import ntk_theta, parse_scaling


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
    if kind == "llama3":  # the frequencies do not depend on max_position_embeddings: it stays the context
        keys = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
        return {"rope_type": "llama3", **{k: s[k] for k in keys}, "rope_theta": theta}, cfg.max_seq_len
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


def legacy_rope(rope: dict) -> dict | None:
    """transformers 4.x's `rope_scaling` for our `rope_parameters` (None for plain RoPE)."""
    if rope["rope_type"] == "default":
        return None
    return {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_theta"}}


def rope_from_hf(
    hf: dict, params: dict | None = None, theta: float = 10000.0, field: str = "rope_parameters"
) -> tuple[float, dict | None, int]:
    """(rope_theta, our rope_scaling or None, our max_seq_len = the training context) from a config.json in either
    format (`params`: the rope dict when the caller picked it, as Gemma's per layer type; `theta`: the family's
    default base); a rope type or option we lack is a ConfigError naming the field."""
    if params is None:
        params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    params = dict(params)
    kind = params.pop("rope_type", params.pop("type", "default"))
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or theta)
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
        "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    }
    if kind not in known:
        raise ConfigError(f"config.json: {field}.rope_type={kind!r} is not supported; supported: {sorted(known)}")
    unknown = sorted(k for k, v in params.items() if k not in known[kind] and v is not None)
    if params.get("partial_rotary_factor", 1.0) == 1.0 and "partial_rotary_factor" in unknown:
        unknown.remove("partial_rotary_factor")  # 1.0: the whole head rotates, as ours does
    if unknown:
        raise ConfigError(f"config.json: {field}.{unknown[0]} is not supported for rope_type={kind!r}")
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
    if kind == "llama3":  # Llama 3.1+: the context stays max_position_embeddings (already the long one)
        keys = ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
        return theta, {"type": "llama3", "factor": factor, **{k: params.get(k) for k in keys}}, max_pos
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
