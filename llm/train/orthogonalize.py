"""Muon's update of many matrices at once: the matrices that have the same shape once laid wide (rows <= cols; a
tall one is transposed, as torch's Muon does) are stacked, and one batched Newton-Schulz orthogonalises the stack.

Per matrix the arithmetic is torch.optim.Muon's (torch.optim._muon): the momentum average and the Nesterov pull
(`lerp`), the cast to bf16, the scaling to Frobenius norm 1, the quintic iteration
x <- a x + (b A + c A^2) x with A = x x^T, decoupled weight decay and the shape-scaled lr. On the CPU a batched bf16
matmul gives each matrix of the stack the bits its own matmul gives (tests/unit/test_muon.py checks the update is
torch's bit for bit), so batching changes the speed, not the numbers: one matmul over the stack instead of one per
matrix. On this project's CPU (one thread, bf16 on AMX) the Newton-Schulz of nanoGPT's 4 x 128 model's 16 matrices
takes 6.5 ms batched and 12.6 ms one at a time (docs: `python -m llm.bench.optimizers`).

A 3-D parameter [n, out, in] (a mixture-of-experts layer's stacked expert weights) is n matrices [out, in]: each is
orthogonalised on its own, in the same stack as the 2-D matrices of its shape, with the lr scaled by its [out, in].
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor


def newton_schulz(x: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """Orthogonalise each matrix of a stack `x` [n, rows, cols] (bf16, rows <= cols): scaled to Frobenius norm 1,
    then `steps` quintic iterations. Each matrix gets what torch's `_zeropower_via_newtonschulz` gives it alone."""
    a, b, c = coefficients
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    n, rows, _ = x.shape
    gram, poly, y = x.new_empty(n, rows, rows), x.new_empty(n, rows, rows), torch.empty_like(x)
    for _ in range(steps):  # into three buffers per stack, not three new tensors per iteration
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)  # b A + c A^2
        torch.baddbmm(x, poly, x, beta=a, out=y)  # a x + poly x
        x, y = y, x
    return x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch's Muon lr scaling of one [rows, cols] matrix: `match_rms_adamw` 0.2 sqrt(max(rows, cols)) (Moonshot),
    `original` (or None) sqrt(max(1, rows / cols)) (Keller Jordan)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}: one of match_rms_adamw, original")


def muon_update(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    keep: Tensor | None = None,
) -> None:
    """One Muon step of 2-D and 3-D parameters (their gradients and momentum buffers), batched by matrix shape.
    `keep` (a 0-d bool tensor): the new weights and momenta are written only where it is true, with no host sync
    (an accelerator's skipped step); None: written in place, as torch's Muon does."""
    if ns_steps >= 100:
        raise ValueError(f"ns_steps={ns_steps}: Newton-Schulz needs fewer than 100 steps")
    # The parameters by the shape of their matrices laid wide: one stack each
    members: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, grad in enumerate(grads):
        if grad.dim() not in (2, 3):
            raise ValueError(
                f"Muon trains 2-D matrices and 3-D stacks of them, not a tensor of shape {tuple(grad.shape)}"
            )
        rows, cols = grad.shape[-2:]
        members[(min(rows, cols), max(rows, cols))].append(i)
    for (rows, cols), indices in members.items():
        counts = [1 if grads[i].dim() == 2 else grads[i].shape[0] for i in indices]
        stack = torch.empty(sum(counts), rows, cols, dtype=torch.bfloat16, device=grads[indices[0]].device)
        slots = torch.split(stack, counts)
        for i, slot in zip(indices, slots):
            grad, buf = grads[i], bufs[i]
            new_buf = buf.lerp_(grad, 1 - momentum) if keep is None else buf.lerp(grad, 1 - momentum)
            slot = (slot if grad.shape[-2] == rows else slot.mT).view(grad.shape)  # the stack's view of the update
            if nesterov:  # the update, computed in fp32, rounded into its bf16 slot as .bfloat16() rounds
                torch.lerp(grad, new_buf, momentum, out=slot)
            else:
                slot.copy_(new_buf)
            if keep is not None:
                torch.where(keep, new_buf, buf, out=buf)
        ortho = newton_schulz(stack, ns_coefficients, ns_steps, eps)
        for i, part in zip(indices, torch.split(ortho, counts)):
            param = params[i]
            part = (part if param.shape[-2] == rows else part.mT).reshape(param.shape)
            step_lr = adjusted_lr(lr, adjust_lr_fn, *param.shape[-2:])
            new_param = param.mul_(1 - lr * weight_decay) if keep is None else param.mul(1 - lr * weight_decay)
            new_param.add_(part, alpha=-step_lr)
            if keep is not None:
                torch.where(keep, new_param, param, out=param)
