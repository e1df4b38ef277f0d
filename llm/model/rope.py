"""Rotary position embeddings (RoPE): inverse frequencies, cos/sin tables and their application to q/k.

The convention is the "rotate half" layout of HF Llama (the two halves of each head dimension form the complex
pairs), so weights trained here rotate exactly as `LlamaForCausalLM` does. Length-extrapolation methods plug in
through `rope_scaling` (a plain dict, or None); `rope_parameters` turns it into inverse frequencies and the
attention factor that scales cos/sin.
"""

from __future__ import annotations

import torch
from torch import nn

from llm.errors import ConfigError

SCALING_TYPES = ("none",)


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for i in [0, d/2): the unscaled RoPE frequencies, shape [head_dim // 2]."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()


def rope_parameters(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim//2], attention_factor) for the given scaling config."""
    kind = "none" if not scaling else str(scaling.get("type", "none"))
    if kind not in SCALING_TYPES:
        raise ConfigError(f"extrapolation.type={kind!r} is not allowed; choose one of {list(SCALING_TYPES)}")
    return default_inv_freq(head_dim, theta), 1.0


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions. Stateless apart from the inverse-frequency buffer."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        if head_dim % 2:
            raise ConfigError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        inv_freq, self.attention_factor = rope_parameters(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the buffer (needed after building on the meta device and moving to a real one)."""
        self.inv_freq.copy_(rope_parameters(self.head_dim, self.theta, self.scaling)[0].to(self.inv_freq.device))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [T] or [B, T] -> cos, sin of shape [T, hd] or [B, T, hd] (each frequency used twice)."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [..., T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., T, hd]
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by cos/sin [T, hd] or [B, T, hd]."""
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
