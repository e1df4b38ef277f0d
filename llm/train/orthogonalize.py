"""Muon's update of many matrices at once: the matrices of one shape are stacked, and one batched Newton-Schulz
orthogonalises the stack.

Per matrix the arithmetic is torch.optim.Muon's (torch.optim._muon): the momentum average and the Nesterov pull
(`lerp`), the cast to bf16, the scaling to Frobenius norm 1, the quintic iteration
x <- a x + (b A + c A^2) x with A = x x^T on the matrix laid wide, decoupled weight decay and the shape-scaled lr.
On the CPU (oneDNN's bf16 matmul) a batched matmul gives each matrix of the stack the bits its own matmul gives,
whatever the operands' layout, and a product taken transposed the bits of the product it transposes (each entry is
the same fp32 sum of the same exact products), so a tall matrix is iterated as it lies, on its transpose's terms
(A = x^T x, x <- a x + x P^T), with no copy into or out of the wide layout torch's Muon works in; its Frobenius
norm is then summed in torch's order too (the matrix's memory order). tests/unit/test_muon.py checks the update is
torch's bit for bit. Batching changes the speed, not the numbers: one matmul over the stack instead of one per
matrix.

On this project's CPU (one thread, bf16 on AMX) the work is laid out for the caches: each matrix's momentum,
Nesterov pull and cast to bf16 run one after the other while it is in cache (one op per matrix beat torch's
foreach ops over all of them, which stream every tensor through memory once per op), then the Newton-Schulz
iterations of all the stacks back to back (0.3 ms a step faster than interleaved at nanoGPT's dims), then each
matrix's decay and update. At nanoGPT's 4 x 128 dims (16 matrices) the Newton-Schulz takes ~6 ms batched and
12.6 ms one at a time (docs/benchmarks.md: `python -m llm.bench.optimizers`).

A 3-D parameter [n, out, in] (a mixture-of-experts layer's stacked expert weights) is n matrices [out, in]: each is
orthogonalised on its own, in the same stack as the 2-D matrices of its shape, with the lr scaled by its [out, in].
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import NamedTuple

import torch
from torch import Tensor

# The bf16 stacks built before their Newton-Schulz runs: all of a small model's, a large one's in groups of this size
GROUP_BYTES = 64 * 2**20


def newton_schulz(x: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """Orthogonalise each matrix of a stack `x` [n, rows, cols] (bf16; scaled in place): scaled to Frobenius norm 1,
    then `steps` quintic iterations. Each matrix gets what torch's `_zeropower_via_newtonschulz` gives it alone; a
    tall one (rows > cols) is iterated on its transpose's terms, as it lies."""
    a, b, c = coefficients
    x = x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp_(min=eps))
    n, rows, cols = x.shape
    side = min(rows, cols)
    gram, poly, y = x.new_empty(n, side, side), x.new_empty(n, side, side), torch.empty_like(x)
    for _ in range(steps):  # into three buffers per stack, not three new tensors per iteration
        if rows > cols:  # x^T <- a x^T + poly x^T, transposed: x <- a x + x poly^T
            torch.bmm(x.mT, x, out=gram)
            torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)
            torch.baddbmm(x, x, poly.mT, beta=a, out=y)
        else:
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


class Stack(NamedTuple):
    """The matrices of one shape [rows, cols]: the gradients they come from (`members`, by index) and how many
    matrices each holds (`counts`: 1 for a 2-D one, n for a 3-D [n, rows, cols])."""

    shape: tuple[int, int]
    members: tuple[int, ...]
    counts: tuple[int, ...]


@functools.lru_cache(maxsize=64)
def stack_plan(shapes: tuple[torch.Size, ...], group_bytes: int) -> tuple[tuple[Stack, ...], ...]:
    """The stacks of gradients of these shapes, in groups of at most `group_bytes` of bf16 (a stack larger than
    that alone). Cached: the same shapes come every step."""
    members: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, shape in enumerate(shapes):
        if len(shape) not in (2, 3):
            raise ValueError(f"Muon trains 2-D matrices and 3-D stacks of them, not a tensor of shape {tuple(shape)}")
        members[tuple(shape[-2:])].append(i)
    groups: list[list[Stack]] = [[]]
    size = 0
    for (rows, cols), indices in members.items():
        counts = tuple(1 if len(shapes[i]) == 2 else shapes[i][0] for i in indices)
        nbytes = 2 * sum(counts) * rows * cols
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(Stack((rows, cols), tuple(indices), counts))
        size += nbytes
    return tuple(tuple(group) for group in groups)


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
    for group in stack_plan(tuple(grad.shape for grad in grads), GROUP_BYTES):
        stacks = [_momentum_into_stack(stack, grads, bufs, momentum, nesterov, keep) for stack in group]
        for k, stack in enumerate(stacks):  # back to back; each input freed as its output comes
            stacks[k] = newton_schulz(stack, ns_coefficients, ns_steps, eps)
        for stack, ortho in zip(group, stacks):
            step_lr = adjusted_lr(lr, adjust_lr_fn, *stack.shape)
            for i, part in zip(stack.members, torch.split(ortho, stack.counts)):
                param = params[i]
                new_param = param.mul_(1 - lr * weight_decay) if keep is None else param.mul(1 - lr * weight_decay)
                new_param.add_(part.view(param.shape), alpha=-step_lr)
                if keep is not None:
                    torch.where(keep, new_param, param, out=param)


def _momentum_into_stack(
    stack: Stack, grads: list[Tensor], bufs: list[Tensor], momentum: float, nesterov: bool, keep: Tensor | None
) -> Tensor:
    """The members' momenta updated and their Nesterov updates in a new bf16 stack, a matrix at a time."""
    out = torch.empty(sum(stack.counts), *stack.shape, dtype=torch.bfloat16, device=grads[stack.members[0]].device)
    for i, slot in zip(stack.members, torch.split(out, stack.counts)):
        grad, buf = grads[i], bufs[i]
        new_buf = buf.lerp_(grad, 1 - momentum) if keep is None else buf.lerp(grad, 1 - momentum)
        slot = slot.view(grad.shape)
        if nesterov:  # the update, computed in fp32, rounded into its bf16 slot as .bfloat16() rounds
            torch.lerp(grad, new_buf, momentum, out=slot)
        else:
            slot.copy_(new_buf)
        if keep is not None:
            torch.where(keep, new_buf, buf, out=buf)
    return out
