"""The attention masks of `gpt.py`: causal with a KV cache, and the sliding-window band (Mistral, Qwen, Gemma 3).

Masks are bool, True where a query may attend: [T, T_keys] or [B, 1, T, T_keys], keys ending at the query's own
position (T_keys = past + T with a KV cache).
"""

from __future__ import annotations

import torch


def causal_mask(T: int, past: int, device) -> torch.Tensor:
    """[T, past + T]: query i (at position past + i) sees keys 0 .. past + i."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


def sliding_mask(T: int, past: int, window: int, attn_mask: torch.Tensor | None, device) -> torch.Tensor:
    """The causal mask (or the given one) narrowed to the last `window` keys of each query, itself included."""
    query = torch.arange(past, past + T, device=device)[:, None]  # [T, 1]
    key = torch.arange(past + T, device=device)[None, :]  # [1, T_keys]
    band = (key <= query) & (key > query - window)  # [T, T_keys]
    return band if attn_mask is None else attn_mask & band
