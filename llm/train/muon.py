"""`optim=muon`: Muon on the 2-D weight matrices inside the blocks, AdamW on everything else, one schedule.

Muon (Keller Jordan, 2024; torch.optim.Muon) replaces each matrix's update by its momentum orthogonalised with a
few Newton-Schulz iterations: every direction of the matrix moves by about the same amount. It is meant for the
hidden layers only, so the embedding, the LM head, the norms and the biases keep AdamW. torch's Muon has what the
published recipes use: Nesterov momentum, decoupled weight decay (`param *= 1 - lr * weight_decay`) and a
shape-dependent lr (`adjust_lr`: `match_rms_adamw` scales lr by 0.2 * sqrt(max(rows, cols)), Moonshot's rule that
makes the update's RMS match AdamW's, so AdamW's lr and weight decay carry over; `original` by
sqrt(max(1, rows / cols)), Keller Jordan's).

`MuonWithAdamW` holds one Muon (`BatchedMuon`: torch's, the matrices of one shape orthogonalised together, see
llm/train/orthogonalize.py) and one torch.optim.AdamW and looks like one optimizer to the loop and
the checkpoints: `param_groups` is Muon's groups then AdamW's, and `state_dict()` numbers the parameters in that
order. Muon needs whole matrices: under FSDP2 (sharded matrices) it is refused (`check_strategy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C
from torch.optim._muon import EPS as NS_EPS

from llm.errors import ConfigError, check_bool, check_choice, check_int, check_number
from llm.model.moe import Router
from llm.train.optim import OptimizerConfig, width_scaled
from llm.train.orthogonalize import muon_update

NS_COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)  # torch's (Keller Jordan's quintic)


def muon_matrices(model: nn.Module, experts: str = "muon", router: str = "adamw") -> set[int]:
    """The ids of what Muon trains: the 2-D weights of the linear layers inside the transformer blocks (attention
    and MLP projections), with `experts="muon"` the 3-D parameters there ([n, out, in]: a mixture-of-experts
    layer's stacked expert matrices) and with `router="muon"` the MoE routers' gate matrices [E, D]. The embedding
    and the LM head (tied to it or not) are not among them."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("optim=muon needs a model with transformer blocks (model.blocks)")
    linear = {id(m.weight) for m in blocks.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad}
    stacks = expert_stacks(model) if experts == "muon" else set()
    gates = {id(m.weight) for m in blocks.modules() if isinstance(m, Router) and m.weight.requires_grad}
    return linear | stacks | (gates if router == "muon" else set())


def expert_stacks(model: nn.Module) -> set[int]:
    """The ids of the 3-D parameters inside the transformer blocks (stacked expert matrices [n, out, in])."""
    blocks = getattr(model, "blocks", None)
    return set() if blocks is None else {id(p) for p in blocks.parameters() if p.dim() == 3 and p.requires_grad}


class BatchedMuon(torch.optim.Muon):
    """torch's Muon, batched: the matrices of one shape are orthogonalised together (llm.train.orthogonalize), with
    torch's arithmetic, so each update is torch's bit for bit (tested). It also takes 3-D parameters [n, out, in]
    (stacked expert weights: n matrices, each orthogonalised and lr-scaled on its own) and keeps torch's state and
    state-dict format (a `momentum_buffer` per parameter; the same group keys), so checkpoints of torch's Muon load.

    With `found_inf` set (a 0-d tensor, 1.0 = skip) it skips a step on the device, as the fused AdamW does: the new
    weights and momenta are kept only where found_inf is 0, with no host sync, a parameter's copies at a time."""

    found_inf: torch.Tensor | None = None

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
    ):
        # torch's Muon.__init__ refuses all but 2-D parameters: its checks and its defaults (the group keys), here
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"Muon: lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Muon: adjust_lr_fn={adjust_lr_fn!r}: None, original or match_rms_adamw")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        torch.optim.Optimizer.__init__(self, params, defaults)
        bad = [tuple(p.shape) for g in self.param_groups for p in g["params"] if p.dim() not in (2, 3)]
        if bad:
            raise ValueError(f"Muon trains 2-D matrices and 3-D stacks of them, not shapes {bad}")

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None and self.found_inf is not None:
            raise ValueError("BatchedMuon: a closure does not go with found_inf")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keep = None if self.found_inf is None else self.found_inf == 0
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            if params:
                muon_update(
                    params,
                    grads,
                    bufs,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    nesterov=group["nesterov"],
                    ns_coefficients=group["ns_coefficients"],
                    ns_steps=group["ns_steps"],
                    eps=group["eps"],
                    adjust_lr_fn=group["adjust_lr_fn"],
                    keep=keep,
                )
        return loss


class MuonWithAdamW:
    """One optimizer over two: Muon's groups first, then AdamW's. Steps, zeroes, saves and loads both.

    On an accelerator (`skip_on_device`, MuonConfig.build) with a fused AdamW a step is skipped on the device: the
    loop sets `found_inf` (as on a fused AdamW) and both honour it, which `defaults["fused"]` tells the loop;
    otherwise the loop reads its skip flag on the host and does not call `step`."""

    def __init__(self, muon: BatchedMuon, adamw: torch.optim.AdamW, skip_on_device: bool = False):
        self.muon, self.adamw = muon, adamw
        self.defaults = {"fused": skip_on_device and bool(adamw.defaults.get("fused"))}
        self.found_inf: torch.Tensor | None = None

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    def step(self) -> None:
        if self.defaults["fused"]:
            self.muon.found_inf = self.adamw.found_inf = self.found_inf
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """One state dict, parameters numbered over Muon's groups then AdamW's (the order of `param_groups`)."""
        m, a = self.muon.state_dict(), self.adamw.state_dict()
        offset = sum(len(g["params"]) for g in m["param_groups"])
        groups = m["param_groups"] + [{**g, "params": [i + offset for i in g["params"]]} for g in a["param_groups"]]
        state = {**m["state"], **{i + offset: s for i, s in a["state"].items()}}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        n_groups = len(self.muon.param_groups)
        if len(sd["param_groups"]) != n_groups + len(self.adamw.param_groups):
            raise ValueError(
                f"optimizer state has {len(sd['param_groups'])} parameter groups; optim=muon has "
                f"{n_groups} Muon + {len(self.adamw.param_groups)} AdamW"
            )
        offset = sum(len(g["params"]) for g in sd["param_groups"][:n_groups])
        m_groups, a_groups = sd["param_groups"][:n_groups], sd["param_groups"][n_groups:]
        self.muon.load_state_dict(
            {
                "state": {i: s for i, s in sd["state"].items() if int(i) < offset},
                "param_groups": [{**g, "ns_coefficients": tuple(g["ns_coefficients"])} for g in m_groups],
            }
        )
        self.adamw.load_state_dict(
            {
                "state": {int(i) - offset: s for i, s in sd["state"].items() if int(i) >= offset},
                "param_groups": [{**g, "params": [int(i) - offset for i in g["params"]]} for g in a_groups],
            }
        )


@dataclass
class MuonConfig(OptimizerConfig):
    """`optim.lr`, `optim.weight_decay`: Muon's, for the block matrices; `optim.adam_lr`, `optim.betas`,
    `optim.eps`: AdamW's, for the embedding, the LM head, norms and biases (no weight decay on them but an untied
    head's, which gets `optim.adam_weight_decay`). A mixture-of-experts model's routed experts train on
    `optim.experts` (muon | adamw) and its routers' gate matrices on `optim.router` (adamw | muon); a dense model
    has neither. The schedule's keys are OptimizerConfig's, one for both. The defaults are conf/optim/muon.yaml's
    (tests/unit/test_config.py compares them)."""

    lr: float = 6e-3
    schedule: str = "wsd"  # warmup-stable-decay
    decay_fraction: float = 0.3
    min_lr_ratio: float = 0.0
    adam_lr: float = 6e-3
    adam_weight_decay: float = 0.0
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr: str = "match_rms_adamw"  # match_rms_adamw (AdamW's lr carries over) | original
    experts: str = "muon"  # MoE: the routed experts' stacked matrices on muon | adamw (no-op for a dense model)
    router: str = "adamw"  # MoE: the router's gate matrix [E, D] on adamw | muon (no-op for a dense model)

    def __post_init__(self):
        super().__post_init__()
        check_number("optim.adam_lr", self.adam_lr, 0, low_open=True)
        check_number("optim.adam_weight_decay", self.adam_weight_decay, 0)
        check_number("optim.momentum", self.momentum, 0, 1, high_open=True)
        check_bool("optim.nesterov", self.nesterov)
        check_int("optim.ns_steps", self.ns_steps, 1)
        check_choice("optim.adjust_lr", self.adjust_lr, {"match_rms_adamw", "original"})
        check_choice("optim.experts", self.experts, {"muon", "adamw"})
        check_choice("optim.router", self.router, {"adamw", "muon"})

    def check_strategy(self, strategy: str) -> None:
        if strategy == "fsdp":
            raise ConfigError(MUON_FSDP)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Muon's group, then AdamW's: `adam` (an untied LM head; a router on AdamW), `adam_no_decay` and, with
        experts=adamw, `adam_experts` (the stacked experts at adam_lr with Muon's weight decay, optim.weight_decay,
        as optim=adamw decays the block matrices). Empty groups but `adam_no_decay` are left out, so a dense
        model's groups are the same whatever `experts` and `router` say."""
        matrices = muon_matrices(model, self.experts, self.router)
        stacks = expert_stacks(model) if self.experts == "adamw" else set()
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        muon, adam_decay, adam_no_decay, adam_experts, seen = [], [], [], [], set()
        for p in model.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in matrices:
                muon.append(p)
            elif id(p) in stacks:
                adam_experts.append(p)
            elif p.dim() >= 2 and id(p) not in embeddings:  # an untied LM head, a router on AdamW
                adam_decay.append(p)
            else:
                adam_no_decay.append(p)
        groups = [
            {"params": muon, "lr": self.lr, "weight_decay": self.weight_decay, "name": "muon"},
            {"params": adam_decay, "lr": self.adam_lr, "weight_decay": self.adam_weight_decay, "name": "adam"},
            {"params": adam_no_decay, "lr": self.adam_lr, "weight_decay": 0.0, "name": "adam_no_decay"},
            {"params": adam_experts, "lr": self.adam_lr, "weight_decay": self.weight_decay, "name": "adam_experts"},
        ]
        return [g for g in groups if g["params"] or g["name"] in ("muon", "adam_no_decay")]

    def build(self, model: nn.Module, device_type: str) -> MuonWithAdamW:
        """On an accelerator a step is skipped on the device (no host sync); on the CPU, where reading the flag
        costs nothing and the copies would, the loop reads it and skips the call."""
        groups = width_scaled(self.param_groups(model), model, self.lr, self.adjust_lr)  # µP's multipliers
        if any(isinstance(p, DTensor) for g in groups for p in g["params"]):
            raise ConfigError(MUON_FSDP)
        muon = BatchedMuon(
            groups[:1],
            lr=self.lr,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            nesterov=self.nesterov,
            ns_steps=self.ns_steps,
            adjust_lr_fn=self.adjust_lr,
        )
        fused = True if self.fused is None else self.fused
        adamw = torch.optim.AdamW(groups[1:], lr=self.adam_lr, betas=self.betas, eps=self.eps, fused=fused)
        return MuonWithAdamW(muon, adamw, skip_on_device=device_type != "cpu")


MUON_FSDP = (
    "optim=muon needs whole matrices and trainer.strategy=fsdp shards them: use trainer.strategy=ddp "
    "(or single), or optim=adamw"
)
