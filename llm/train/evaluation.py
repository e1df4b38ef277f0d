"""An evaluation during a run: the validation loss (and what the objective derives from it) over a fixed prefix of
the validation split, shared out over the ranks, plus the data's report and the objective's own `evaluate`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llm.contract import Objective
from llm.dist.env import DistEnv
from llm.dist.parallel import eval_shard, reduce_sums


@torch.no_grad()
def evaluate(
    model,
    data,
    objective: Objective,
    sampler,
    env: DistEnv,
    eval_batches: int | None,
    eval_micro: int,
    micro_batch_size: int,
    autocast: Callable,
    to_batch: Callable,
) -> dict[str, float]:
    """val_* metrics (as the objective summarizes them: loss, bits per byte) over the first `eval_batches` x
    `eval_micro` validation sequences (all of them when None), in micro-batches of `micro_batch_size`; the data's
    report (`sampler`: what was consumed) and the objective's own `evaluate`. `to_batch(indices, dataset)`: a
    collated batch on the device. The model is left in training mode."""
    model.eval()
    n = len(data.val)
    if eval_batches:
        n = min(n, eval_batches * eval_micro)
    sums, count = {}, 0
    # each rank its share of the micro-batches, all ranks the same number of forwards (weight 0: padding)
    for start, weight in eval_shard(n, micro_batch_size, env):
        indices = list(range(start, min(n, start + micro_batch_size)))
        with autocast():
            metrics = objective.val_metrics(model, to_batch(indices, data.val))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0) + v.float() * weight
        count += weight
    sums, count = reduce_sums(sums, count)  # over ranks
    means = objective.summarize({k: (v / count).item() for k, v in sums.items()})
    out = {**{f"val_{k}": v for k, v in means.items()}, **data.report(sampler)}
    with autocast():
        out.update(objective.evaluate(model, data))
    model.train()
    return out
