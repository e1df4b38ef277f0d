"""AdamW with the usual parameter groups, and the learning-rate schedule as a pure function of the step.

No weight decay on norms, biases and embeddings (every parameter with fewer than 2 dims, plus embeddings).
The schedule keeps no state of its own: lr_at(step) is all a resumed run needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llm.errors import ConfigError, check_bool, check_choice, check_int, check_number


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr (cosine, linear)
    fused: bool | None = None  # None: the fused kernel (CPU and CUDA); it also skips non-finite steps on the device

    def __post_init__(self):
        check_number("optim.lr", self.lr, 0, low_open=True)
        check_number("optim.weight_decay", self.weight_decay, 0)
        check_number("optim.eps", self.eps, 0, low_open=True)
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        check_choice("optim.schedule", self.schedule, {"cosine", "linear", "constant"})
        check_number("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        if self.fused is not None:
            check_bool("optim.fused", self.fused)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ConfigError(f"optim.betas={self.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        for i, beta in enumerate(self.betas):
            check_number(f"optim.betas[{i}]", beta, 0, 1, high_open=True)
        self.betas = tuple(float(b) for b in self.betas)

    def param_groups(self, model: nn.Module) -> list[dict]:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        seen = set()
        for p in model.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
        return [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def build(self, model: nn.Module, device_type: str) -> torch.optim.AdamW:
        fused = True if self.fused is None else self.fused
        return torch.optim.AdamW(self.param_groups(model), lr=self.lr, betas=self.betas, eps=self.eps, fused=fused)

    def lr_at(self, step: int, max_steps: int) -> float:
        """Learning rate for optimizer step `step` (0-based): linear warmup, then the decay schedule."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, max_steps - self.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * shape)
