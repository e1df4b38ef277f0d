"""LoRA (Hu et al. 2021): low-rank adapters on the linear layers of a built model, the base weights frozen.

A targeted `nn.Linear` becomes a `LoRALinear`: the same `weight` and `bias` (so the base keeps its state-dict
names and loads as before) plus `lora_a` [r, in] and `lora_b` [out, r]:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T          (B starts at zero: the adapted model starts as the base)

`apply_lora(model, LoRAConfig(...))` wraps a model in place (any task gets it: the trainer sees a plain model
whose only trainable tensors are the adapters); `adapters_disabled(model)` runs the base alone (DPO's reference);
`merge_lora(model)` folds the adapters into the weights (export). Targets are our module names: `qkv`, `proj`
(attention), `gate`, `up`, `down` (MLP), or `all-linear` (every linear layer of the blocks).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm.errors import ConfigError, check_int, check_number

ALL_LINEAR = "all-linear"
LORA_KEYS = ("lora_a", "lora_b")


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    target_modules: str | list = ALL_LINEAR  # our module names (qkv, proj, gate, up, down) or all-linear

    def __post_init__(self):
        check_int("peft.rank", self.rank, 1)
        check_number("peft.alpha", self.alpha, 0, low_open=True)
        check_number("peft.dropout", self.dropout, 0, 1, high_open=True)
        targets = self.target_modules
        if isinstance(targets, str) and targets != ALL_LINEAR:
            targets = [targets]
        if not isinstance(targets, str):
            if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
                raise ConfigError(
                    f"peft.target_modules={self.target_modules!r} must be {ALL_LINEAR} or a non-empty list of "
                    f"module names ({', '.join(TARGETS)})"
                )
            unknown = sorted(set(targets) - set(TARGETS))
            if unknown:
                raise ConfigError(
                    f"peft.target_modules: unknown module name(s) {unknown}; allowed: {', '.join(TARGETS)} "
                    f"or {ALL_LINEAR}"
                )
            targets = sorted(set(targets), key=TARGETS.index)
        self.target_modules = targets
        self.alpha = float(self.alpha)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"type": "lora", **asdict(self)}


# Our linear layers inside a block, by the attribute name of their module (llm/model/gpt.py): what LoRA may target.
TARGETS = ("qkv", "proj", "gate", "up", "down")


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update beside it; `weight` and `bias` keep their names (and stay frozen)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: nothing copied
        for name, value in vars(base).items():  # e.g. is_residual_projection
            if not name.startswith("_") and name not in ("in_features", "out_features", "training"):
                setattr(self, name, value)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **kw))  # [out, r]: the update starts at 0
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and peft) initialise a weight
        self.rank, self.scaling = rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_enabled = True

    def forward(self, x):  # [..., in] -> [..., out]
        y = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b) * self.scaling

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """The update as a full matrix [out, in]: scaling * B A."""
        return (self.lora_b.float() @ self.lora_a.float() * self.scaling).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _targets(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent, attribute) of every linear layer of the blocks that the config targets."""
    wanted = TARGETS if config.target_modules == ALL_LINEAR else config.target_modules
    found = []
    for parent_name, parent in model.named_modules():
        if ".blocks." not in f".{parent_name}":
            continue
        for attr, child in parent.named_children():
            if attr in wanted and isinstance(child, nn.Linear):
                found.append((f"{parent_name}.{attr}", parent, attr))
    missing = sorted(set(wanted) - {attr for _, _, attr in found})
    if missing and config.target_modules != ALL_LINEAR:
        present = sorted({a for _, p, a in _all_linear(model)}, key=TARGETS.index)
        raise ConfigError(
            f"peft.target_modules: {missing} not in this model (its linear layers: {', '.join(present)}); "
            f"name only those, or use {ALL_LINEAR}"
        )
    return found


def _all_linear(model):
    return _targets(model, LoRAConfig(target_modules=ALL_LINEAR))


def base_sha256(model: nn.Module) -> str:
    """A digest of the model's weights (names, shapes, dtypes, bytes; tied tensors once): what adapters were
    trained on. A resume or export against other base weights is refused by comparing it."""
    h = hashlib.sha256()
    seen = set()
    for name, t in model.state_dict().items():
        if name.split(".")[-1] in LORA_KEYS or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        t = t.detach().contiguous().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"")
    return h.hexdigest()


def apply_lora(model: nn.Module, config: LoRAConfig, base: dict | None = None) -> nn.Module:
    """Freeze every parameter of `model` and wrap the targeted linear layers with adapters, in place. `base`
    (what the weights came from: init_from, sha256) is kept with the config in `model.peft_config`, which
    checkpoints write beside the adapters. Returns the model."""
    if getattr(model, "peft_config", None):
        raise ConfigError("the model already has LoRA adapters")
    targets = _targets(model, config)
    model.requires_grad_(False)
    for _, parent, attr in targets:
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config.rank, config.alpha, config.dropout))
    model.peft_config = {**config.to_dict(), "modules": [name for name, _, _ in targets], "base": base or {}}
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under their state-dict names (`blocks.0.attn.qkv.lora_a`, ...)."""
    return {k: v for k, v in model.state_dict().items() if k.split(".")[-1] in LORA_KEYS}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model computes as its base (adapters off): DPO's reference without a second copy."""
    modules = list(lora_modules(model).values())
    before = [m.lora_enabled for m in modules]
    for m in modules:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, before):
            m.lora_enabled = was


@torch.no_grad()
def merge_lora(model: nn.Module, add: bool = True) -> nn.Module:
    """Fold every adapter into its weight (W += scaling B A) and put plain nn.Linear layers back, in place: the
    model computes the same function with the architecture it had before `apply_lora`. `add=False` drops the
    adapters instead (the base alone)."""
    for name, module in lora_modules(model).items():
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        if add:
            plain.weight.add_(module.delta())
        for key, value in vars(module).items():
            if key == "is_residual_projection":
                plain.is_residual_projection = value
        setattr(parent, attr, plain)
    model.peft_config = None
    model.requires_grad_(True)
    return model


def trainable_report(model: nn.Module) -> dict:
    """Trainable and total parameters (tied tensors counted once) and the trainable share."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"params": total, "trainable_params": trainable, "trainable_share": trainable / max(total, 1)}
