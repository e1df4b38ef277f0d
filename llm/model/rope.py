"""Rotary position embeddings (RoPE): inverse frequencies, cos/sin tables and their application to q/k.

The convention is the "rotate half" layout of HF Llama (the two halves of each head dimension form the complex
pairs), so weights trained here rotate exactly as `LlamaForCausalLM` does. Length-extrapolation methods plug in
through `rope_scaling` (the `extrapolation` config group: a plain dict, or None); `rope_parameters` turns it into
inverse frequencies and the attention factor that scales cos/sin. The formulas are those of transformers'
`modeling_rope_utils` (types linear, dynamic, yarn, llama3 there; `ntk` with `dynamic: true` here is their `dynamic`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llm.errors import ConfigError, check_number

SCALING_TYPES = ("none", "linear", "ntk", "yarn", "llama3")
_COMMON = {"type", "factor", "original_max_position_embeddings"}
SCALING_KEYS = {
    "none": {"type"},
    "linear": _COMMON,
    "ntk": _COMMON | {"dynamic"},
    "yarn": _COMMON | {"beta_fast", "beta_slow", "attention_factor", "truncate"},
    "llama3": _COMMON | {"low_freq_factor", "high_freq_factor"},
}


def _number(key: str, value, minimum: float = 0.0):
    """`value` if it is a number above 0 and at least `minimum`, else ConfigError naming extrapolation.<key>."""
    if minimum:
        return check_number(f"extrapolation.{key}", value, minimum)
    return check_number(f"extrapolation.{key}", value, 0, low_open=True)


class RopeScaling(dict):
    """An `extrapolation` dict as `parse_scaling` returns it: checked, with the defaults filled in. GPTConfig keeps
    this form; parsing it again returns it unchanged (the scaling is parsed once)."""


def parse_scaling(scaling: dict | None) -> RopeScaling:
    """Validate an `extrapolation` dict and fill in the defaults (those of HF); None or {} mean type none."""
    if isinstance(scaling, RopeScaling):
        return scaling
    s = dict(scaling or {})
    kind = s["type"] = str(s.get("type", "none"))
    if kind not in SCALING_TYPES:
        raise ConfigError(f"extrapolation.type={kind!r} is not allowed; choose one of {list(SCALING_TYPES)}")
    unknown = sorted(set(s) - SCALING_KEYS[kind])
    if unknown:
        raise ConfigError(
            f"extrapolation key(s) {unknown} not used by extrapolation.type={kind!r} "
            f"(its keys: {sorted(SCALING_KEYS[kind])})"
        )
    if kind == "none":
        return RopeScaling(s)
    if s.get("factor") is None:
        raise ConfigError(f"extrapolation.factor is required for extrapolation.type={kind!r}")
    s["factor"] = float(_number("factor", s["factor"], 1.0))
    if kind == "ntk":
        s["dynamic"] = s.get("dynamic", False)
        if not isinstance(s["dynamic"], bool):
            raise ConfigError(f"extrapolation.dynamic={s['dynamic']!r} must be true or false")
    original = s.get("original_max_position_embeddings")
    if original is None and (kind in ("yarn", "llama3") or s.get("dynamic")):
        raise ConfigError(
            f"extrapolation.original_max_position_embeddings (the training context) is required for "
            f"extrapolation.type={kind!r}" + (" with dynamic=true" if kind == "ntk" else "")
        )
    if original is not None and (not isinstance(original, int) or isinstance(original, bool) or original < 1):
        raise ConfigError(f"extrapolation.original_max_position_embeddings={original!r} must be a positive integer")
    if kind == "llama3":
        for key, default in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0)):  # Llama 3.1's values
            s[key] = float(_number(key, default if s.get(key) is None else s[key]))
        if s["high_freq_factor"] <= s["low_freq_factor"]:
            raise ConfigError(
                f"extrapolation.high_freq_factor={s['high_freq_factor']} must be > "
                f"low_freq_factor={s['low_freq_factor']}"
            )
    if kind == "yarn":
        for key, default in (("beta_fast", 32), ("beta_slow", 1)):  # null means the default, as in HF
            s[key] = _number(key, default if s.get(key) is None else s[key])
        if s["beta_fast"] < s["beta_slow"]:
            raise ConfigError(f"extrapolation.beta_fast={s['beta_fast']} must be >= beta_slow={s['beta_slow']}")
        if s.get("attention_factor") is not None:
            s["attention_factor"] = float(_number("attention_factor", s["attention_factor"]))
        s.setdefault("attention_factor", None)
        s["truncate"] = s.get("truncate", True)
        if not isinstance(s["truncate"], bool):
            raise ConfigError(f"extrapolation.truncate={s['truncate']!r} must be true or false")
    return RopeScaling(s)


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for i in [0, d/2): the unscaled RoPE frequencies, shape [head_dim // 2]."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()


def ntk_theta(head_dim: int, theta: float, factor: float) -> float:
    """NTK-aware scaling (bloc97, "NTK-Aware Scaled RoPE", r/LocalLLaMA, 2023): instead of shrinking positions,
    raise the base to theta * factor^(d/(d-2)); the lowest frequency is then divided by exactly `factor` while the
    highest ones barely change, so nearby tokens keep their resolution."""
    return theta * factor ** (head_dim / (head_dim - 2))


def dynamic_ntk_theta(head_dim: int, theta: float, factor: float, original: int, seq_len):
    """Dynamic NTK (emozilla, r/LocalLLaMA, 2023, on bloc97's NTK-aware base): the base grows with the current
    length L, theta * (factor * L / original - (factor - 1))^(d/(d-2)), and is theta itself up to `original`.
    `seq_len` may be an int or a 0-dim tensor (then so is the result, computed without leaving the device)."""
    stretch = factor * seq_len / original - (factor - 1)
    stretch = stretch.clamp(min=1.0) if isinstance(stretch, torch.Tensor) else max(stretch, 1.0)
    return theta * stretch ** (head_dim / (head_dim - 2))


def yarn_parameters(
    head_dim: int,
    theta: float,
    factor: float,
    original: int,
    beta_fast: float = 32,
    beta_slow: float = 1,
    attention_factor: float | None = None,
    truncate: bool = True,
) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models", 2309.00071).

    "NTK-by-parts": dimensions that turn more than beta_fast times over the original context keep their frequency,
    those turning fewer than beta_slow times are interpolated (divided by factor), with a linear ramp between.
    cos/sin are multiplied by attention_factor, by default 0.1 ln(factor) + 1 (the paper's sqrt(1/t)).
    """

    def dim_of(turns: float) -> float:  # the (fractional) pair index whose wavelength fits `turns` times
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 1: interpolate
    inv_freq = default_inv_freq(head_dim, theta)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


def llama3_inv_freq(
    head_dim: int, theta: float, factor: float, original: int, low_freq_factor: float, high_freq_factor: float
) -> torch.Tensor:
    """Llama 3.1's RoPE scaling (Meta, "The Llama 3 Herd of Models", 2024): wavelengths shorter than
    original / high_freq_factor keep their frequency, those longer than original / low_freq_factor are divided by
    `factor`, and the ones between are blended by how many times they turn over the original context."""
    inv_freq = default_inv_freq(head_dim, theta)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high_freq_factor) & (wavelen <= original / low_freq_factor)
    return torch.where(medium, blended, scaled)


def rope_parameters(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim//2], attention_factor) for the given scaling config. For dynamic NTK these are
    the frequencies up to the original context; RotaryEmbedding rescales them per call past it."""
    s = parse_scaling(scaling)
    kind = s["type"]
    if kind == "none":
        return default_inv_freq(head_dim, theta), 1.0
    if kind == "linear":  # position interpolation (Chen et al. 2023, arXiv 2306.15595): position m -> m / factor
        return default_inv_freq(head_dim, theta) / s["factor"], 1.0
    if kind == "llama3":
        keys = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
        return llama3_inv_freq(head_dim, theta, *(s[k] for k in keys)), 1.0
    if kind == "yarn":
        return yarn_parameters(
            head_dim,
            theta,
            s["factor"],
            s["original_max_position_embeddings"],
            s["beta_fast"],
            s["beta_slow"],
            s["attention_factor"],
            s["truncate"],
        )
    if head_dim <= 2:
        raise ConfigError(f"extrapolation.type=ntk needs a head dimension above 2, got {head_dim}")
    if not s["dynamic"]:
        return default_inv_freq(head_dim, ntk_theta(head_dim, theta, s["factor"])), 1.0
    return default_inv_freq(head_dim, theta), 1.0


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions. Stateless apart from the inverse-frequency buffer."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        if head_dim % 2:
            raise ConfigError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim, self.theta, self.scaling = head_dim, theta, parse_scaling(scaling)
        self.dynamic = bool(self.scaling.get("dynamic"))
        inv_freq, self.attention_factor = rope_parameters(head_dim, theta, self.scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # dynamic NTK: the unscaled frequencies

    def reset_parameters(self) -> None:
        """Recompute the buffer (needed after building on the meta device and moving to a real one)."""
        self.inv_freq.copy_(rope_parameters(self.head_dim, self.theta, self.scaling)[0].to(self.inv_freq.device))

    def context_limit(self, max_seq_len: int) -> int:
        """Length the positions are meant for: factor x the original context with scaling, else max_seq_len."""
        if self.scaling["type"] == "none":
            return max_seq_len
        return int(self.scaling["factor"] * (self.scaling.get("original_max_position_embeddings") or max_seq_len))

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [T] or [B, T] -> cos, sin of shape [T, hd] or [B, T, hd] (each frequency used twice).

        seq_len (optional): max(position_ids) + 1 when the caller knows it on the host; only dynamic NTK uses it,
        and reads it from position_ids on the device otherwise.
        """
        inv_freq = self._dynamic_inv_freq(position_ids, seq_len) if self.dynamic else self.inv_freq
        freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [..., T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., T, hd]
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)

    def _dynamic_inv_freq(self, position_ids: torch.Tensor, seq_len: int | None) -> torch.Tensor:
        """Dynamic NTK frequencies for the current length, recomputed every call (no host sync either way)."""
        original = self.scaling["original_max_position_embeddings"]
        if seq_len is not None and seq_len <= original:
            return self.inv_freq
        length = seq_len if seq_len is not None else position_ids.max() + 1
        theta = dynamic_ntk_theta(self.head_dim, self.theta, self.scaling["factor"], original, length)
        exponents = torch.arange(0, self.head_dim, 2, device=self.inv_freq.device, dtype=torch.float32)
        scaled = 1.0 / theta ** (exponents / self.head_dim)
        return scaled if seq_len is not None else torch.where(length > original, scaled, self.inv_freq)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by cos/sin [T, hd] or [B, T, hd]."""
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
