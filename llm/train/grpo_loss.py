"""GRPO's two formulas as small units: group-normalised advantages, and the clipped policy-ratio loss with its
three normalisations and the optional KL to the reference. Tensors in, tensors out (tested against hand-computed
values in tests/unit/test_grpo_loss.py).

Shapes: N completions (B prompts x G, each prompt's G completions adjacent), T completion positions.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4):
    """rewards [N] -> (advantages [N], zero-variance groups [B] as bool).

    A_i = r_i - mean(group of i), divided by (std(group) + eps) when `scale` (GRPO, DAPO; std with Bessel's
    correction, as TRL); Dr. GRPO leaves it unscaled. A group whose rewards are all equal has A = 0: no signal."""
    r = rewards.float().view(-1, group_size)  # [B, G]
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    advantages = centred / (std + eps) if scale else centred
    return advantages.flatten(), (r == r[:, :1]).all(dim=1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate (Schulman's k3): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_tokens: int | None = None,
    token_count: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate (PPO's, per token) with group advantages, as a loss to minimise.

    logps, old_logps, ref_logps, mask [N, T] (mask: 1 on completion tokens); advantages [N].
    per token: l = -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta k3(pi, ref), rho = exp(logp - old)
    grpo:    mean over completions of (sum of l over its tokens / its length)           (DeepSeekMath)
    dr_grpo: sum of l over all tokens / (N x max_tokens), a constant                    (Dr. GRPO, Liu et al. 2025)
    dapo:    sum of l over all tokens / number of tokens: the token-level mean          (DAPO, Yu et al. 2025)
    This batch may be one micro-batch of the step's (gradient accumulation, ranks), whose losses the trainer
    averages. grpo and dr_grpo divide by a count that is the same in every micro-batch (its completions), so
    their mean over micro-batches is the whole batch's loss. dapo's token count differs between micro-batches:
    `token_count` is then the step's completion tokens per micro-batch (all of them over all micro-batches and
    ranks, divided by how many micro-batches), so that the mean over micro-batches is the step's token mean; None:
    this batch's own count (the batch is the whole step).
    Metrics: clip_fraction (tokens whose clipped term was the one taken), kl (beta > 0), loss."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    m = mask.to(logps.dtype)
    A = advantages[:, None].to(logps.dtype)  # [N, 1]
    ratio = torch.exp(logps - old_logps)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - epsilon, 1 + eps_high) * A)
    metrics = {}
    if beta:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * m).sum() / m.sum().clamp(min=1)).detach()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (m.size(0) * (max_tokens or m.size(1)))
    elif loss_type == "dapo":
        count = m.sum() if token_count is None else torch.as_tensor(token_count, dtype=m.dtype, device=m.device)
        loss = (per_token * m).sum() / count.clamp(min=1)
    else:
        raise ValueError(f"loss_type={loss_type!r}; choose one of {LOSS_TYPES}")
    clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
    metrics["clip_fraction"] = ((clipped.to(m.dtype) * m).sum() / m.sum().clamp(min=1)).detach()
    metrics["loss"] = loss.detach()
    return loss, metrics
