"""Objectives: what a task computes from a batch. The trainer only calls `loss(model, batch)`.

An objective returns (scalar loss to minimise, metrics dict of 0-d tensors). Metrics stay on the device; the
trainer averages them over micro-batches and reads them only on logging steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llm.model import unwrap_model

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over labels != -100. logits [..., V], labels [...]."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
    """The same value as cross_entropy(hidden @ weight.T, labels), computed `chunk_size` tokens at a time with
    each chunk's logits recomputed in backward, so full [B*T, V] fp32 logits never exist at once."""
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_size):
        sl = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss_sum, hidden[sl], weight, labels[sl], use_reentrant=False)
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class LanguageModeling:
    """Next-token prediction: mean cross-entropy over every labelled position (labels of -100 are ignored).

    loss_chunk_size > 0 computes the loss in chunks of that many tokens (saves the fp32 logits' memory at large
    vocab × sequence sizes, at the cost of recomputing the LM head in backward).
    """

    def __init__(self, loss_chunk_size: int = 0):
        self.loss_chunk_size = loss_chunk_size

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        kwargs = {k: batch[k] for k in ("position_ids", "attn_mask") if k in batch}
        if self.loss_chunk_size:
            hidden = model(batch["input_ids"], return_hidden=True, **kwargs)
            loss = chunked_cross_entropy(hidden, unwrap_model(model).lm_head.weight, batch["labels"],
                                         self.loss_chunk_size)
        else:
            loss = cross_entropy(model(batch["input_ids"], **kwargs), batch["labels"])
        return loss, {"loss": loss.detach()}
