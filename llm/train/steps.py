"""The parts of a training step: the global batch split over ranks and micro-batches, the context check, the
forward and backward over micro-batches and the optimizer step (a step whose gradient norm is not finite, or whose
loss the StepGuard calls a spike, is skipped; too many in a row stop the run, and a run whose every step was
skipped trained nothing)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llm.contract import MAX_METRIC, SUM_METRIC, Objective, combine_metric
from llm.dist.parallel import clip_grad_norm_, set_gradient_sync
from llm.errors import ConfigError, TrainingError
from llm.model import update_router_bias
from llm.train.optim import OptimizerConfig
from llm.train.settings import TrainerSettings


def split_batch(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """The global batch over ranks and micro-batches: (sequences per forward, accumulation steps). A micro-batch
    of None is each rank's whole share."""
    per_rank = batch_size // world_size
    micro = micro_batch_size or max(1, per_rank)
    if batch_size % (micro * world_size) and micro_batch_size is None:
        raise ConfigError(f"trainer.batch_size={batch_size} must be a multiple of the number of ranks, {world_size}")
    if batch_size % (micro * world_size):
        raise ConfigError(
            f"trainer.batch_size={batch_size} must be a multiple of trainer.micro_batch_size="
            f"{micro} x {world_size} rank(s)"
        )
    return micro, per_rank // micro


def check_fits(settings: TrainerSettings, max_seq_len: int, optim: OptimizerConfig) -> None:
    """Before the data is prepared: the sequence fits the model, the optimizer works under the strategy."""
    optim.check_strategy(settings.hardware.strategy)  # optim=muon refuses fsdp
    seq_len = settings.loop.seq_len
    if seq_len > max_seq_len:
        raise ConfigError(
            f"trainer.seq_len={seq_len} is longer than the model's context model.max_seq_len={max_seq_len}"
        )


def check_trained(steps: int, skipped: int) -> None:
    """A run whose every step was skipped as non-finite trained nothing: an error, never 'done'."""
    if steps and skipped >= steps:
        raise TrainingError(
            f"all {steps} steps had a non-finite loss or gradient norm and were skipped: nothing was "
            f"trained (check optim.lr and the data); the checkpoints hold the starting weights"
        )


def train_on(
    model,
    raw_model,
    objective: Objective,
    optimizer,
    batches: list[dict],
    autocast: Callable,
    grad_clip,
    guard,
    aid: float | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The optimizer steps of one training step over its micro-batches (`objective.inner_steps` of them over the
    same batches: 1 but for task=grpo's option; `objective.prepare_step` sees the batches together first), each on
    the gradients of their mean loss (reduced over the ranks on the last micro-batch only). `guard` (a StepGuard)
    judges the first pass's loss for a spike. Returns the metrics' means (device tensors), the last gradient norm,
    and 1.0 when any update was skipped. `aid`: multiply the loss by it (testing aids: NaN for trainer.nan_steps,
    100 for trainer.spike_steps)."""
    batches = objective.prepare_step(batches)  # what needs the whole step first (grpo's dapo normaliser)
    sums: dict[str, torch.Tensor] = {}
    n, inner = len(batches), objective.inner_steps
    bad = torch.zeros((), device=next(raw_model.parameters()).device)
    for i in range(inner):
        for m, batch in enumerate(batches):
            set_gradient_sync(model, m == n - 1)  # reduce on the last micro-batch only
            with autocast():
                loss, metrics = objective.loss(model, batch)
            if aid is not None:
                loss = loss * aid
                metrics = {**metrics, "loss": loss.detach()}
            (loss / n).backward()
            for k, v in metrics.items():  # the step's mean; a :max metric its maximum, a :sum metric its sum
                v = v.float() / (1 if k.endswith(MAX_METRIC) else inner if k.endswith(SUM_METRIC) else n * inner)
                sums[k] = combine_metric(k, sums.get(k), v)
        spike = guard.spike(sums.get("loss"), inner) if i == 0 else None
        grad_norm, skipped = optimizer_step(optimizer, raw_model.parameters(), grad_clip, spike)
        update_router_bias(raw_model, skipped)  # model.moe.balance=aux_free: the step's load nudges the bias
        bad = torch.maximum(bad, skipped)  # any skipped update marks the step
    return sums, grad_norm, bad


def optimizer_step(optimizer, parameters, grad_clip: float | None, skip: torch.Tensor | None = None):
    """Clip, step and zero the gradients; returns (the gradient norm, 1.0 if the update was skipped: a non-finite
    norm, or `skip` set, a loss spike). Without a host sync where the optimizer takes found_inf (`defaults["fused"]`:
    the fused AdamW, and optim=muon on an accelerator with it: llm.train.muon.BatchedMuon); otherwise the flag is
    read on the host.
    A non-finite loss gives non-finite gradients, and the norm is over the reduced gradients: every rank agrees."""
    grad_norm = clip_grad_norm_(parameters, grad_clip or float("inf"))
    bad = (~torch.isfinite(grad_norm)).float()
    if skip is not None:
        bad = torch.maximum(skip, bad)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = bad
        optimizer.step()
    elif not bad.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, bad


def time_shares(started: float, prepared: float, ended: float, device) -> dict[str, torch.Tensor]:
    """A step's time split into preparing its batch (sampling, for task=grpo) and training on it, as shares."""
    share = (prepared - started) / max(ended - started, 1e-9)
    return {
        "time/generate_share": torch.tensor(share, device=device),
        "time/train_share": torch.tensor(1 - share, device=device),
    }


def check_consecutive(step: int, consecutive: int, limit: int, skipped_in_all: int) -> None:
    """TrainingError when the last `limit` steps were all skipped."""
    if consecutive >= limit:
        raise TrainingError(
            f"stopping at step {step}: {consecutive} consecutive steps had a non-finite loss or "
            f"gradient norm, or a loss spike (trainer.max_consecutive_skips={limit}); "
            f"{skipped_in_all} skipped in all; the checkpoints hold finite weights"
        )
