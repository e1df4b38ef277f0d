"""Mixture-of-experts feed-forward: a router picks `experts_per_token` of `num_experts` SwiGLU experts per token.

`model.moe` (a dict, checked by `parse_moe`; null = a dense model) selects it per model:
  num_experts, experts_per_token   E experts, k of them per token
  expert_hidden                    each expert's hidden width (null: model.ffn_hidden)
  shared_experts                   that many always-on experts of the same width, as one SwiGLU (DeepSeek's)
  layers                           the sparse layers (0-based; null: every layer); the others keep the dense MLP
  score                            softmax (Mixtral, Qwen3-MoE, OLMoE) | sigmoid (DeepSeek-V3) over the router logits
  norm_topk                        the k chosen scores renormalised to sum to 1 (Mixtral always; Qwen3-MoE and
                                   OLMoE with norm_topk_prob)
  balance                          aux_loss: + aux_loss_coef x the load-balancing loss (Switch / HF's, pooled over
                                   the layers); aux_free: DeepSeek-V3's per-expert bias, added to the scores for
                                   choosing only, nudged by bias_update_rate toward balance after each step; none
  z_loss_coef                      + that x the router z-loss (ST-MoE: mean squared log-sum-exp of the logits)
  dispatch                         grouped (torch._grouped_mm over the tokens sorted by expert; on CPU, where it
                                   is measured faster, other devices loop) | loop (one matmul per expert): the same
                                   numbers, the speeds in docs/moe.md

The router runs in fp32 (autocast off). Dispatch is dropless: every token reaches its k experts (tokens sorted by
expert, the experts run, the weighted outputs added back per token), so `dropped_tokens` is always 0. Under
torch.compile the dispatch runs eagerly (`_eager_dispatch`), the rest of the model compiles.
Expert weights are stacked per layer as [E, out, in] parameters (`experts.gate`, `experts.up`, `experts.down`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llm.errors import ConfigError, check_bool, check_choice, check_int, check_number

MOE_DEFAULTS = {
    "num_experts": 8,
    "experts_per_token": 2,
    "expert_hidden": None,
    "shared_experts": 0,
    "layers": None,
    "score": "softmax",
    "norm_topk": True,
    "balance": "aux_loss",
    "aux_loss_coef": 0.01,
    "z_loss_coef": 0.0,
    "bias_update_rate": 0.001,
    "dispatch": "grouped",
}
BALANCES = ("aux_loss", "aux_free", "none")
TRAINING_KEYS = ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "dispatch")  # no weight depends on them


def parse_moe(moe, n_layer: int) -> dict | None:
    """`model.moe` checked, with its defaults filled in (a plain dict); None stays None (a dense model)."""
    if moe is None:
        return None
    if not isinstance(moe, Mapping):
        raise ConfigError(f"model.moe={moe!r} must be a mapping of MoE keys or null (dense)")
    unknown = sorted(set(moe) - set(MOE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown model.moe key(s) {unknown}; known keys: {sorted(MOE_DEFAULTS)}")
    m = {**MOE_DEFAULTS, **dict(moe)}
    check_int("model.moe.num_experts", m["num_experts"], 1)
    check_int("model.moe.experts_per_token", m["experts_per_token"], 1, m["num_experts"])
    check_int("model.moe.expert_hidden", m["expert_hidden"], 1, allow_none=True)
    check_int("model.moe.shared_experts", m["shared_experts"], 0)
    check_choice("model.moe.score", m["score"], {"softmax", "sigmoid"})
    check_bool("model.moe.norm_topk", m["norm_topk"])
    check_choice("model.moe.balance", m["balance"], set(BALANCES))
    for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        m[key] = float(check_number(f"model.moe.{key}", m[key], 0))
    check_choice("model.moe.dispatch", m["dispatch"], {"grouped", "loop"})
    if m["layers"] is not None:
        m["layers"] = list(m["layers"])
        bad = [i for i in m["layers"] if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layer]
        if bad or len(set(m["layers"])) != len(m["layers"]):
            raise ConfigError(
                f"model.moe.layers={m['layers']} must list distinct layer indices in [0, {n_layer - 1}]"
                + (f" (not {bad[0]!r})" if bad else "")
            )
    return m


class Experts(nn.Module):
    """E SwiGLU experts stacked: gate and up [E, F, D], down [E, D, F]; `forward` runs the tokens sorted by expert."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, dispatch: str):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.up = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.down = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.down.is_residual_projection = True
        self.dispatch = dispatch

    def init_weights(self, std: float, residual_scale: float) -> None:
        for w in (self.gate, self.up):
            nn.init.normal_(w, 0.0, std)
        nn.init.normal_(self.down, 0.0, std * residual_scale)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, D], its rows sorted by expert, counts [E] rows per expert -> [N, D]."""
        if self.dispatch == "grouped" and x.device.type == "cpu":  # one kernel per projection, no host sync
            # (on CPU, where it is measured; elsewhere the loop until it is measured there: docs/moe.md)
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(_grouped(x, self.gate, offs)) * _grouped(x, self.up, offs)
            return _grouped(h, self.down, offs)
        # split and unbind, not indexing: their backward is one concatenation / stack, not a full-size gradient
        # per expert
        out = []
        weights = zip(self.gate.unbind(0), self.up.unbind(0), self.down.unbind(0))
        for xe, (gate, up, down) in zip(x.split(counts.tolist()), weights):
            out.append(F.linear(F.silu(F.linear(xe, gate)) * F.linear(xe, up), down))
        return torch.cat(out)


_EAGER_DISPATCH = []


def _eager_dispatch():
    """`MoE._dispatch` run eagerly under torch.compile (trainer.compile): its rows per expert are data, which the
    grouped matmul's fake tensors refuse (they ask for bf16) and the loop's split breaks the graph on; the router,
    the shared experts and the rest of the model compile, the numbers stay eager's. Made when the first MoE is built,
    outside any trace (`torch.compiler.disable` called while tracing breaks the caller's graph), not at import:
    it imports dynamo (1.5 s), which a training process imports anyway (the optimizer's step) but an import of
    llm.model need not."""
    if not _EAGER_DISPATCH:
        _EAGER_DISPATCH.append(torch.compiler.disable(MoE._dispatch))
    return _EAGER_DISPATCH[0]


def _grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, in] times their expert's w[e] [out, in] transposed: [N, out]."""
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


class SharedExperts(nn.Module):
    """The always-on experts, as one SwiGLU of their summed width."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down.is_residual_projection = True

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Router(nn.Module):
    """Logits x W^T in fp32 -> scores (softmax or sigmoid) -> the top k (by score + bias when aux_free) -> their
    scores as weights (renormalised with norm_topk). `bias` [E] is a buffer: it chooses, it never weighs."""

    def __init__(self, d_model: int, m: dict):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(m["num_experts"], d_model))
        self.k, self.score, self.norm_topk = m["experts_per_token"], m["score"], m["norm_topk"]
        self.register_buffer("bias", torch.zeros(m["num_experts"]) if m["balance"] == "aux_free" else None)

    def init_weights(self, std: float, residual_scale: float) -> None:
        nn.init.normal_(self.weight, 0.0, std)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor):
        """x [N, D] -> (logits [N, E] fp32, scores [N, E], chosen [N, k], weights [N, k] fp32)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choose = scores if self.bias is None else scores + self.bias
        chosen = choose.topk(self.k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, scores, chosen, weights


class MoE(nn.Module):
    """The sparse feed-forward of one layer: [B, T, D] -> [B, T, D]. After each forward `stats` holds what the
    balancing terms and the log need (`router_terms`); in training `record_load` adds its load to the step's."""

    def __init__(self, d_model: int, ffn_hidden: int, m: dict):
        super().__init__()
        hidden = m["expert_hidden"] or ffn_hidden
        self.num_experts, self.k, self.rate = m["num_experts"], m["experts_per_token"], m["bias_update_rate"]
        self.router = Router(d_model, m)
        self.experts = Experts(self.num_experts, d_model, hidden, m["dispatch"])
        self.shared = SharedExperts(d_model, m["shared_experts"] * hidden) if m["shared_experts"] else None
        self.register_buffer("step_load", torch.zeros(self.num_experts), persistent=False)  # aux_free: this step's
        self.stats: dict[str, torch.Tensor | int] = {}
        _eager_dispatch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits, scores, chosen, weights = self.router(x)
        out, counts = (_eager_dispatch() if torch.compiler.is_compiling() else MoE._dispatch)(self, x, chosen, weights)
        if self.shared is not None:
            out = out + self.shared(x)
        probs = scores if self.router.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        self.stats = {
            "counts": counts.float(),
            "prob_sum": probs.sum(0),
            "rows": x.size(0),  # a number: a tensor made from it would be a host-to-device copy (a sync) per layer
            "z": logits.logsumexp(-1).square().mean(),
            "dropped": (chosen.numel() - counts.sum()).float(),
        }
        return out.reshape(shape)

    def _dispatch(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor):
        """x [N, D], each token's k experts and weights [N, k] -> (the weighted sum of its experts [N, D], [E] rows
        per expert)."""
        flat = chosen.flatten()  # [N k]: token n's j-th expert at n k + j
        order = flat.argsort(stable=True)  # the (token, slot) pairs sorted by expert
        counts = torch.bincount(flat, minlength=self.num_experts)  # [E]
        token = order // self.k
        y = self.experts(x[token], counts) * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, y), counts  # every pair back to its token: nothing dropped

    def record_load(self) -> None:
        """Add this forward's tokens per expert to the step's load (aux_free's update reads it)."""
        if self.router.bias is not None:
            self.step_load += self.stats["counts"].detach()


def idle_params(moe: dict | None, n_layer: int, d_model: int, ffn_hidden: int) -> int:
    """The expert parameters a token does not use: (E - k) of the E experts' gate, up and down in each sparse layer
    (total minus this is the active parameters per token)."""
    if moe is None:
        return 0
    sparse = n_layer if moe["layers"] is None else len(moe["layers"])
    width = moe["expert_hidden"] or ffn_hidden
    return sparse * 3 * d_model * width * (moe["num_experts"] - moe["experts_per_token"])


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def load_balancing_loss(counts: torch.Tensor, prob_sum: torch.Tensor, rows: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as transformers computes it over the layers pooled: E x Σ_e f_e P_e with
    f_e the share of (token, layer) rows choosing e (summing to k) and P_e the mean router probability of e.
    counts / prob_sum [E] are summed over the layers, rows the number of (token, layer) rows."""
    return counts.numel() * ((counts / rows) * (prob_sum / rows)).sum()


def router_terms(model: nn.Module, cfg: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """(the balancing penalty to add to the loss, metrics) from the model's last forward; None for a dense model.
    Metrics: `moe/aux_loss` (pooled as above), `moe/router_z_loss` (mean over layers), `moe/load_imbalance` (max /
    mean tokens per expert, averaged over the sparse layers), `moe/dropped_tokens` (0: dropless)."""
    layers = [m.stats for m in moe_layers(model) if m.stats]
    if not layers:
        return None
    counts = torch.stack([s["counts"] for s in layers])  # [L, E]
    aux = load_balancing_loss(counts.sum(0), sum(s["prob_sum"] for s in layers), sum(s["rows"] for s in layers))
    z = torch.stack([s["z"] for s in layers]).mean()
    penalty = z * cfg["z_loss_coef"]
    if cfg["balance"] == "aux_loss":
        penalty = penalty + aux * cfg["aux_loss_coef"]
    metrics = {
        "moe/aux_loss": aux.detach(),
        "moe/router_z_loss": z.detach(),
        "moe/load_imbalance": (counts.max(-1).values / counts.mean(-1)).mean(),
        "moe/dropped_tokens": sum(s["dropped"] for s in layers),
    }
    return penalty, metrics


@torch.no_grad()
def update_router_bias(model: nn.Module, skipped: torch.Tensor | None = None) -> None:
    """aux_free, after an optimizer step: each sparse layer's bias moves by bias_update_rate toward balance (up for
    an expert below the mean load of the step, down above it), centred to mean 0, and the step's load is cleared.
    The loads are summed over the ranks first (one collective), so every rank keeps the same bias. A skipped step
    (`skipped` = 1.0) leaves the bias as it was."""
    layers = [m for m in moe_layers(model) if m.router.bias is not None]
    if not layers:
        return
    loads = torch.stack([m.step_load for m in layers])  # [L, E]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loads)
    delta = torch.sign(loads.mean(-1, keepdim=True) - loads)
    delta = delta - delta.mean(-1, keepdim=True)
    for m, d in zip(layers, delta):
        new = m.router.bias + m.rate * d
        m.router.bias.copy_(new if skipped is None else torch.where(skipped > 0, m.router.bias, new))
        m.step_load.zero_()
