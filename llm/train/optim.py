"""AdamW with the usual parameter groups, and the learning-rate schedule (llm.train.schedule) it follows.

No weight decay on norms, biases and embeddings (every parameter with fewer than 2 dims, plus embeddings).
Every group has its own peak lr (its `lr` as built); the schedule's factor of the step multiplies them all, so
a resumed run needs only the step. `optim=muon` (llm.train.muon.MuonConfig) extends this class.

µP (model.parametrization=mup, llm/model/config.py): `width_scaled` multiplies each parameter's peak lr by µP's
table for the width ratio m = d_model / base_width (`lr_multiplier`): the block matrices (hidden weights) 1/m under
AdamW; under Muon 1/sqrt(m) with adjust_lr=match_rms_adamw (its update's spectral norm grows as sqrt(width)) and 1
with `original` (already width-free), each by the optimizer that trains it (an MoE's experts and router: the
one optim.experts / optim.router names); the embedding, LM head, norms and biases 1 (the head's 1/m is the
model's output multiplier). A group with several multipliers is split; at m = 1 nothing changes. The defaults are
conf/optim/adamw.yaml's (tests/unit/test_config.py compares them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm.errors import ConfigError, check_bool, check_choice, check_int, check_number
from llm.model.moe import Router
from llm.train.schedule import DECAY_SHAPES, SCHEDULES, lr_factor


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | linear | constant | wsd (after warmup)
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr (cosine, linear, wsd)
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays (before it: the peak lr)
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt
    fused: bool | None = None  # None: the fused kernel (CPU and CUDA); it also skips non-finite steps on the device
    init_state: str = "fresh"  # fresh | checkpoint: start from init_from's optimizer state (llm.train.branch)

    def __post_init__(self):
        check_number("optim.lr", self.lr, 0, low_open=True)
        check_number("optim.weight_decay", self.weight_decay, 0)
        check_number("optim.eps", self.eps, 0, low_open=True)
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        check_choice("optim.schedule", self.schedule, set(SCHEDULES))
        check_number("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("optim.decay_fraction", self.decay_fraction, 0, 1)
        check_choice("optim.decay_shape", self.decay_shape, set(DECAY_SHAPES))
        check_choice("optim.init_state", self.init_state, {"fresh", "checkpoint"})
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
        return [
            {"params": decay, "weight_decay": self.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]

    def build(self, model: nn.Module, device_type: str) -> torch.optim.AdamW:
        fused = True if self.fused is None else self.fused
        groups = width_scaled(self.param_groups(model), model, self.lr)
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=fused)

    def check_strategy(self, strategy: str) -> None:
        """A ConfigError when this optimizer cannot work under `trainer.strategy` (AdamW works under all)."""

    def lr_factor(self, step: int, max_steps: int) -> float:
        """The schedule's factor of every group's peak lr at optimizer step `step` (0-based)."""
        return lr_factor(
            step,
            max_steps,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            min_lr_ratio=self.min_lr_ratio,
            decay_fraction=self.decay_fraction,
            decay_shape=self.decay_shape,
        )

    def lr_at(self, step: int, max_steps: int) -> float:
        """`optim.lr` as scheduled at optimizer step `step` (0-based)."""
        return self.lr * self.lr_factor(step, max_steps)


def set_lrs(optimizer, peak_lrs: list[float], factor: float) -> None:
    """One schedule for every group: each at `factor` x its own peak lr (in the order of `param_groups`)."""
    for group, peak in zip(optimizer.param_groups, peak_lrs):
        group["lr"] = peak * factor


def group_lrs(optimizer) -> dict[str, float]:
    """What the log shows: `lr` (the first group's: optim.lr as scheduled) and `lr/<name>` of every other named
    group whose lr differs from it (optim=muon: AdamW's)."""
    first = optimizer.param_groups[0]["lr"]
    others = {f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups[1:] if g.get("name") and g["lr"] != first}
    return {"lr": first, **others}


def hidden_matrices(model: nn.Module) -> set[int]:
    """The ids of the 2-D weights of the linear layers and MoE routers inside the transformer blocks, and of the
    3-D parameters there (stacked expert matrices): µP's hidden weights, whose fan-in grows with the width."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return set()
    linear = {id(m.weight) for m in blocks.modules() if isinstance(m, (nn.Linear, Router))}
    return linear | {id(p) for p in blocks.parameters() if p.dim() == 3}


def lr_multiplier(width_mult: float, hidden: bool, muon_adjust: str | None = None) -> float:
    """µP's lr multiplier of one parameter at width ratio m = width_mult: a hidden matrix's 1/m under AdamW,
    1/sqrt(m) under Muon with match_rms_adamw, 1 under Muon's `original`; 1 for every other parameter."""
    if not hidden or width_mult == 1:
        return 1.0
    if muon_adjust is None:
        return 1.0 / width_mult
    return width_mult**-0.5 if muon_adjust == "match_rms_adamw" else 1.0


def width_scaled(groups: list[dict], model: nn.Module, lr: float, muon_adjust: str | None = None) -> list[dict]:
    """`groups` with µP's lr multipliers applied (see the module doc): each group's lr (default `lr`) times its
    parameters' multiplier, a group whose parameters differ split in two (`<name>_hidden` for the hidden
    matrices). Under the standard parametrization, or at width_mult 1, the groups unchanged."""
    width_mult = getattr(getattr(model, "config", None), "width_mult", 1.0)
    if width_mult == 1:
        return groups
    hidden = hidden_matrices(model)
    out = []
    for group in groups:
        parts: dict[float, list] = {}
        for p in group["params"]:
            # the multiplier of the optimizer that trains it: Muon's group, or AdamW (the rest under optim=muon,
            # such as an MoE's router on optim.router=adamw or its experts on optim.experts=adamw)
            adjust = muon_adjust if group.get("name") == "muon" else None
            parts.setdefault(lr_multiplier(width_mult, id(p) in hidden, adjust), []).append(p)
        for mult, params in sorted(parts.items(), reverse=True):
            name = group["name"] if mult == 1 or len(parts) == 1 else f"{group['name']}_hidden"
            out.append({**group, "params": params, "lr": group.get("lr", lr) * mult, "name": name})
        if not parts:
            out.append(group)
    return out
