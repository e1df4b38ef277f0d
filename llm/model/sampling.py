"""Generation's two small rules beside the model: which token comes next (greedy, top-k, nucleus sampling), and
where each token of a left-padded batch sits (its position, the keys it may attend to)."""

from __future__ import annotations

import torch


def left_padding_inputs(keep: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention of the last `new` of L tokens in left-padded rows. keep [B, L]: True on tokens,
    False on padding -> position_ids [B, new] (each row counts from its own first token) and attn_mask
    [B, 1, new, L]: causal, never to padding; a padding position attends to itself only, so its (unused) output
    stays finite."""
    L = keep.size(1)
    positions = (keep.long().cumsum(dim=1) - 1).clamp(min=0)[:, L - new :]  # [B, new]
    causal = torch.ones(new, L, dtype=torch.bool, device=keep.device).tril(diagonal=L - new)  # [new, L]
    itself = torch.zeros(new, L, dtype=torch.bool, device=keep.device)
    itself[:, L - new :] = torch.eye(new, dtype=torch.bool, device=keep.device)
    return positions, ((causal & keep[:, None, :]) | itself)[:, None]


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits [B, V] -> token ids [B, 1]: greedy at temperature 0, else top-k / nucleus (top-p) sampling."""
    if temperature < torch.finfo(logits.dtype).tiny:  # 0, or so small that it is 0 in the logits' dtype (x / 0: NaN)
        return logits.argmax(dim=-1, keepdim=True)
    # the largest logit made 0 first: a tiny temperature then sends the others to -inf, never the whole row to inf
    # (inf - inf is NaN: no distribution to draw from)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
