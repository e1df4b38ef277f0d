"""Document boundaries inside packed rows: positions that restart at each document and the block-diagonal causal
mask that keeps attention within one document. SFT packing (`posttrain.py`) and document-masked pretraining
windows (`pretrain.py`, `task.data.document_mask`) build their `position_ids` / `attn_mask` here.
"""

from __future__ import annotations

import torch


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, T] -> bool [B, 1, T, T]: query i sees key j iff j <= i and both belong to the same document."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # [T, T]
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]  # [B, 1, T, T]


def eos_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """input_ids [..., T] of a packed token stream -> position_ids [..., T] that restart at 0 after every EOS.

    The EOS ends its document: it keeps the position after the document's last token (and so attends to its own
    document); the token after it starts the next document at position 0. The first token of a window is
    position 0 too, even in the middle of a document: a window sees nothing before itself."""
    T = input_ids.size(-1)
    index = torch.arange(T, device=input_ids.device).expand_as(input_ids)  # [..., T]
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[..., 0] = True
    starts[..., 1:] = input_ids[..., :-1] == eos_id  # right after an EOS
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values  # [..., T] its document's start
    return index - first


def documents_of(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [B, T] that restart at 0 for each document -> document index [B, T] (0, 1, ... per row)."""
    return (position_ids == 0).cumsum(-1)
