"""What the rooms agree on: the batch every dataset yields, and the interfaces every data object and objective offer.

model, data, eval and train all import this module (it imports only torch), so none of them has to import
another room for a constant or a key name.

A batch is a dict of tensors:
- language modelling and SFT: `input_ids` [B, T] and `labels` [B, T] (IGNORE_INDEX where no loss), and when SFT
  packs several samples per row, `position_ids` [B, T] and `attn_mask` [B, 1, T, T] (block-diagonal, causal);
- preference pairs: the same keys for each side, prefixed (`chosen_input_ids`, `rejected_labels`, ...), and once
  the objective has scored the reference, `ref_chosen_logp` / `ref_rejected_logp` [B].
"""

from __future__ import annotations

from pathlib import Path

import torch

IGNORE_INDEX = -100  # label of a position without loss (prompt, padding): data writes it, the loss skips it
INPUT_IDS, LABELS = "input_ids", "labels"
POSITION_IDS, ATTN_MASK = "position_ids", "attn_mask"  # packed rows only
MODEL_INPUTS = (POSITION_IDS, ATTN_MASK)  # optional keys passed on to the model's forward as they are
CHOSEN, REJECTED = "chosen", "rejected"  # the two sides of a preference pair


# How a training metric of `Objective.loss` is combined over a step's micro-batches, the steps of a log line and
# the ranks: by default the mean. A key ending in MAX_METRIC is the maximum (logged without the suffix); one
# ending in SUM_METRIC the sum (counts and moments of the step's samples, which `Objective.summarize_train` turns
# into the logged statistics: exact over every sample of every rank, not a mean of per-batch statistics).
MAX_METRIC, SUM_METRIC = ":max", ":sum"


def combine_metric(key: str, total, value):
    """`value` of metric `key` added to the running `total` (None: none yet) as its suffix says: the larger one,
    or the sum (the mean's sum, divided by the count at the end)."""
    if total is None:
        return value
    return torch.maximum(total, value) if key.endswith(MAX_METRIC) else total + value


def side_key(side: str, key: str) -> str:
    """The key of one side of a preference pair: side_key(CHOSEN, INPUT_IDS) == 'chosen_input_ids'."""
    return f"{side}_{key}"


def ref_logp_key(side: str) -> str:
    """The reference model's summed log-probability of one side: 'ref_chosen_logp'."""
    return f"ref_{side}_logp"


def batch_tokens(batch: dict) -> int:
    """Tokens a batch feeds the model (every `*input_ids` tensor; shapes only, no device sync)."""
    return sum(v.numel() for k, v in batch.items() if k.endswith(INPUT_IDS))


class Data:
    """What a task's data object offers the trainer and the objectives (data=... / post_data=... build one).

    `prepare()` does the work (tokenize, cache, split) and returns the object; then `train` and `val` are map-style
    datasets whose items collate into the batch above, and `tokenizer` is the run's. Optional, with defaults here:
    `token_bytes`, UTF-8 bytes of text per token id (special tokens 0), which makes the validation report bits per
    byte (None: no such table, e.g. chat rows whose templates add text); `report(sampler)`, what the run has
    consumed so far (a mixture's realised shares) for the log and results.json. A task's objective may ask for
    more of its own data class (SFT and DPO: `eval_examples`)."""

    tokenizer = None
    train: torch.utils.data.Dataset | None = None
    val: torch.utils.data.Dataset | None = None
    token_bytes = None

    def prepare(self) -> Data:
        raise NotImplementedError

    def report(self, sampler) -> dict:
        return {}


class Objective:
    """What a task computes from a batch. The trainer calls only these methods, never asks which task it runs.

    `loss` is required; the others have defaults that do nothing (or reuse `loss`). `trains = False` declares an
    evaluation-only task (task=eval_length): the trainer then runs zero steps, builds no optimizer and reports how
    long the evaluation took. An objective that makes its own training batches from the model (task=grpo samples
    completions) does it in `prepare`, declares `generates = True` (the trainer then logs the share of each step
    spent preparing vs training) and may take `inner_steps` optimizer steps over each prepared batch."""

    trains: bool = True
    generates: bool = False
    inner_steps: int = 1

    def setup(self, model, data) -> None:
        """Once before the first step, with the starting weights (before a resume restores later ones)."""

    def prepare(self, model, batch: dict, step: int) -> dict:
        """The training batch of optimizer step `step` (0-based) from the collated data batch, before any gradient:
        the identity, except for an objective that samples from the model (without gradient) to build it."""
        return batch

    def describe_step(self, batch_size: int, seq_len: int, micro_batch_size: int, accum_steps: int) -> str:
        """What one training step consumes, in words, for the plan line the trainer logs before the first step."""
        return (
            f"{batch_size} sequences x {seq_len} tokens ({accum_steps} micro-batch(es) of {micro_batch_size} per rank)"
        )

    def prepare_step(self, batches: list[dict]) -> list[dict]:
        """The step's prepared micro-batches (this rank's, in order) together, before any gradient: for what
        depends on the whole step rather than one micro-batch (task=grpo's dapo normaliser, the step's completion
        tokens over every micro-batch and rank). Called on every rank each step (it may hold a collective); the
        default returns them as they are."""
        return batches

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss to minimise, metrics as 0-d tensors on the device). Also run on validation batches."""
        raise NotImplementedError

    def val_metrics(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Metrics of one validation batch (0-d tensors). Default: those of `loss`; an objective may add sums that
        `summarize` turns into ratios (bits per byte: nats and bytes)."""
        return self.loss(model, batch)[1]

    def summarize_train(self, metrics: dict[str, float]) -> dict[str, float]:
        """The logged training metrics from the reduced ones (their SUM_METRIC keys: sums over the log line's
        samples on every rank); keys left with a suffix are logged without it."""
        return metrics

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        """The reported validation metrics from the means of `val_metrics` over the evaluated batches."""
        return metrics

    def evaluate(self, model, data) -> dict:
        """Extra metrics at every evaluation (exact match, preference accuracy, ...), as plain values."""
        return {}

    def finish(self, results: dict, run_dir: Path) -> None:
        """After results.json is written (rank 0): task-specific artefacts such as tables and plots."""
