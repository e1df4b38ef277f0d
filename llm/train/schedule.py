"""The learning-rate schedule as a pure function of the step: the factor (0..1] that multiplies every parameter
group's peak lr. No state of its own, so a resumed run needs only the step.

    cosine | linear   warmup, then decay over all remaining steps to min_lr_ratio
    constant          warmup, then the peak lr
    wsd               warmup, stable at the peak, then decay over the last decay_fraction of the steps (those
                      after the warmup at most): warmup-stable-decay, "trapezoidal"; the decay linear or 1-sqrt
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")


def lr_factor(
    step: int,
    max_steps: int,
    *,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
) -> float:
    """The lr of optimizer step `step` (0-based) of `max_steps`, as a fraction of the peak."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        start = max(warmup_steps, max_steps - round(decay_fraction * max_steps))  # the decay's first step: never
        decay_steps = max_steps - start  # inside the warmup (an anneal's decay_fraction=1 decays after it)
        if step < start or decay_steps <= 0:
            return 1.0
        progress = min(1.0, (step - start + 1) / decay_steps)  # the last step reaches the floor
        shape = 1 - math.sqrt(progress) if decay_shape == "1-sqrt" else 1 - progress
    else:
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * shape
