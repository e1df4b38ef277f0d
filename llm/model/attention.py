"""The attention kernel of `gpt.py` and its masks: `scaled_dot_product_attention` as is, or written out when the
scores are soft-capped (Gemma 2), which SDPA cannot do; and the sliding-window band (Mistral, Qwen, Gemma 3).

Masks are bool, True where a query may attend: [T, T_keys] or [B, 1, T, T_keys], keys ending at the query's own
position (T_keys = past + T with a KV cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(T: int, past: int, device) -> torch.Tensor:
    """[T, past + T]: query i (at position past + i) sees keys 0 .. past + i."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


def sliding_mask(T: int, past: int, window: int, attn_mask: torch.Tensor | None, device) -> torch.Tensor:
    """The causal mask (or the given one) narrowed to the last `window` keys of each query, itself included."""
    query = torch.arange(past, past + T, device=device)[:, None]  # [T, 1]
    key = torch.arange(past + T, device=device)[None, :]  # [1, T_keys]
    band = (key <= query) & (key > query - window)  # [T, T_keys]
    return band if attn_mask is None else attn_mask & band


def attend(q, k, v, mask, is_causal: bool, scale: float | None, softcap: float | None, dropout: float):
    """q [B, H, T, hd], k/v [B, K, T_keys, hd] -> [B, H, T, hd]; K may divide H (grouped-query attention).

    scale None is 1/sqrt(hd); softcap c turns scores s into c * tanh(s / c) before the mask and softmax."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=k.size(1) != q.size(1),
        )
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, T_keys, hd]
    scores = q @ k.transpose(-2, -1) * (q.size(-1) ** -0.5 if scale is None else scale)  # [B, H, T, T_keys]
    scores = softcap * torch.tanh(scores / softcap)
    if is_causal:
        mask = causal_mask(q.size(2), k.size(2) - q.size(2), q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(scores.float().softmax(dim=-1).to(q.dtype), p=dropout)
    return weights @ v
