"""Bits per byte: a loss that does not depend on the tokenizer, so runs with different vocabularies (a sweep over
`tokenizer.vocab_size`, a char-level baseline) can be compared.

bpb = (summed nats of the target tokens) / (UTF-8 bytes those tokens stand for) / ln 2. The bytes of each target
come from the data object's `token_bytes` table (`llm.data.tokenizer.token_byte_lengths`: EOS and other special
tokens count 0). An objective reports the two sums per batch as metrics (`NATS`, `BYTES`); their means over the
evaluated batches have the same ratio as their totals, and `summarize` turns them into `bpb`.
"""

from __future__ import annotations

import math

import torch

from llm.contract import IGNORE_INDEX

NATS, BYTES = "bpb_nats", "bpb_bytes"  # per-batch sums, replaced by `bpb` in the reported metrics


def byte_table(data, device) -> torch.Tensor | None:
    """The data object's bytes-per-token table on `device`, or None when it has none (e.g. SFT rows)."""
    table = data.token_bytes  # llm.contract.Data: None where the data has no such table
    return None if table is None else torch.as_tensor(table, dtype=torch.float32, device=device)


def label_bytes(labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Summed UTF-8 bytes of the labelled targets (IGNORE_INDEX positions count nothing): a 0-d float tensor."""
    keep = labels != IGNORE_INDEX
    return torch.where(keep, table[labels.clamp(min=0)], 0.0).sum()


def nll_metrics(nll: torch.Tensor, labels: torch.Tensor, table: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Validation metrics from the summed NLL of `labels`' targets: the mean `loss`, and with a bytes table the two
    sums that `summarize` turns into `bpb` (used by every language-modelling objective)."""
    metrics = {"loss": (nll / (labels != IGNORE_INDEX).sum().clamp(min=1)).detach()}
    if table is not None:
        metrics.update({NATS: nll.detach().float(), BYTES: label_bytes(labels, table)})
    return metrics


def bits_per_byte(nats: float, num_bytes: float) -> float:
    return nats / num_bytes / math.log(2) if num_bytes > 0 else float("nan")


def summarize(metrics: dict) -> dict:
    """The metrics with the NATS / BYTES pair (means or sums) replaced by their ratio in bits, `bpb`."""
    if NATS not in metrics or BYTES not in metrics:
        return metrics
    out = {k: v for k, v in metrics.items() if k not in (NATS, BYTES)}
    out["bpb"] = bits_per_byte(float(metrics[NATS]), float(metrics[BYTES]))
    return out
