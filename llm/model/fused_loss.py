"""The LM head and the cross-entropy fused: per-token NLL of `hidden @ weight.T` against labels, computed a chunk
of tokens at a time, so the full [N, V] logits never exist and no log-softmax pass is left for backward.

Two reductions:
- `sum`: one scalar. Its gradient is the same for every token, so it is formed chunk by chunk *in forward*
  (softmax - one-hot, then grad_hidden = G @ W and grad_weight += G^T @ hidden) and backward only scales it:
  no logits are kept, and the log-softmax backward, the one-hot fill and the second read of the logits are gone.
  This is what pretraining and SFT use.
- `none`: NLL per token [N] (for DPO's per-sequence sums, whose gradient differs per sequence): forward forms
  G @ W per chunk and keeps G = softmax - one-hot (the same memory as the log-softmax autograd keeps for the plain
  loss); backward scales G @ W and hidden by each token's incoming gradient and does the one matmul left.

z-loss (`z_loss` = c > 0, reduction `sum` only): c x the sum over labelled tokens of lse^2, lse = log-sum-exp of
the token's logits (PaLM's auxiliary loss), joins the same pass: its gradient d(c lse^2)/dlogits = 2 c lse softmax
is folded into G (G = softmax (1 + 2 c lse) - one-hot), so it costs no memory beyond one lse per token. The call
then returns (NLL + c Σ lse^2, the NLL, Σ lse^2), the last two detached (for the log).

A weight that needs no gradient (a frozen head, as under LoRA) gets none: no [V, D] gradient buffer, no matmul
for it, and no G kept. Labels of -100 are ignored (NLL 0, no gradient). `vocab_size` < V: only the first
vocab_size rows of the weight are tokens, the rest padding (kept for matmul-friendly shapes); their logits are set
to -inf in each chunk, so the softmax, the NLL and lse are over the real vocabulary, as in the plain
`cross_entropy(hidden @ weight[:vocab_size].T, labels)` this equals, and the padding rows get a zero gradient.
Under autocast the matmuls run in the autocast dtype and the softmax in fp32; gradients come back in the dtypes of
hidden and weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm.contract import IGNORE_INDEX


def auto_chunk_size(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Tokens per chunk: about 8 MiB of fp32 logits on CPU (stays in cache), 256 MiB on an accelerator."""
    budget = 2**21 if device.type == "cpu" else 2**26
    return max(1, min(n_tokens, budget // vocab))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _chunk_softmax_nll(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, vocab_size: int, out=None):
    """h [n, D], w [V, D] (compute dtype), labels [n] -> (probs [n, V] fp32 softmax over the first vocab_size
    columns (0 beyond), nll [n] fp32 (0 if ignored), safe labels [n], valid [n] bool, lse [n] fp32 log-sum-exp).
    `out` (optional, fp32 [>= n, V]) is reused for the logits."""
    if out is not None:  # fp32: reusing one buffer spares a fresh allocation per chunk
        logits = torch.mm(h, w.t(), out=out[: h.size(0)])
    else:
        logits = (h @ w.t()).float()  # [n, V]
    logits[:, vocab_size:] = float("-inf")  # padding rows: probability 0, no gradient
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    target = logits.gather(1, safe[:, None]).squeeze(1)  # [n]
    peak = logits.amax(dim=1, keepdim=True)
    probs = logits.sub_(peak).exp_()  # in place: logits are not needed again
    total = probs.sum(dim=1, keepdim=True)
    lse = (peak + total.log()).squeeze(1)
    nll = torch.where(valid, lse - target, 0.0)
    return probs.div_(total), nll, safe, valid, lse


def _minus_one_hot_(probs, safe, valid, lse=None, z_loss: float = 0.0) -> torch.Tensor:
    """probs -> d nll / d logits = softmax - one_hot(label), rows of ignored tokens zeroed; in place. With z_loss
    (and lse [n]) the z term's gradient joins it: softmax (1 + 2 z_loss lse) - one_hot."""
    keep = valid.to(probs.dtype)[:, None]
    scale = keep if not z_loss else keep * (1 + 2 * z_loss * lse[:, None])
    return probs.mul_(scale).scatter_add_(1, safe[:, None], -keep)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, reduction, need_grad, need_grad_w, z_loss, vocab_size):
        dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            n = hidden.size(0)
            nll = torch.empty(n, device=hidden.device, dtype=torch.float32)
            z = torch.zeros((), device=hidden.device, dtype=torch.float32)  # z_loss: Σ lse^2 of the labelled tokens
            grad_h = torch.empty_like(hidden) if need_grad else None
            grad_w = None  # a frozen head (LoRA) needs none: no [V, D] buffer, no matmul, no G kept
            if need_grad and need_grad_w and reduction == "sum":
                grad_w = torch.zeros_like(weight, dtype=torch.float32)
            kept = []  # reduction "none": softmax - one-hot per chunk, for backward
            buf = None
            if dtype == torch.float32 and (reduction == "sum" or not need_grad):  # no chunk kept: one buffer
                buf = torch.empty(min(n, chunk_size), weight.size(0), device=hidden.device, dtype=torch.float32)
            for start in range(0, n, chunk_size):
                end = min(n, start + chunk_size)
                h = hidden[start:end].to(dtype)
                probs, nll[start:end], safe, valid, lse = _chunk_softmax_nll(h, w, labels[start:end], vocab_size, buf)
                if z_loss:
                    z += torch.where(valid, lse.square(), 0.0).sum()
                if need_grad:
                    g = _minus_one_hot_(probs, safe, valid, lse, z_loss)
                    if reduction == "sum" and dtype == torch.float32:  # write straight into the gradients
                        torch.mm(g, w, out=grad_h[start:end])
                        if grad_w is not None:
                            grad_w.addmm_(g.t(), h)
                    elif reduction == "sum":
                        grad_h[start:end] = g.to(dtype) @ w
                        if grad_w is not None:
                            grad_w += (g.to(dtype).t() @ h).float()
                    else:  # grad_h needs only a per-token scale later: form G @ W now, keep G for grad_w
                        grad_h[start:end] = g.to(dtype) @ w
                        if need_grad_w:
                            kept.append(g.to(dtype))
        ctx.chunk_size, ctx.reduction, ctx.dtype, ctx.need_grad_w = chunk_size, reduction, dtype, need_grad_w
        if need_grad and reduction == "sum":
            ctx.save_for_backward(grad_h, *([grad_w.to(weight.dtype)] if grad_w is not None else []))
        elif need_grad:
            ctx.save_for_backward(grad_h, hidden, weight, *kept)
        if not z_loss:
            return nll.sum() if reduction == "sum" else nll
        total = nll.sum()
        ctx.mark_non_differentiable(total, z)
        return total + z_loss * z, total, z

    @staticmethod
    def backward(ctx, grad_out, *_logged):  # z_loss: the NLL and Σ lse^2 returned beside the total are detached
        if ctx.reduction == "sum":
            grad_h, *grad_w = ctx.saved_tensors
            return grad_h * grad_out, grad_w[0] * grad_out if grad_w else None, None, None, None, None, None, None, None
        grad_h, hidden, weight, *kept = ctx.saved_tensors
        grad_out = grad_out.float()[:, None]  # [N, 1]: one incoming gradient per token
        if not ctx.need_grad_w:
            return (grad_h * grad_out).to(hidden.dtype), None, None, None, None, None, None, None, None
        with torch.autocast(hidden.device.type, enabled=False):
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
            for i, g in enumerate(kept):  # grad_w = sum over chunks of G^T @ (grad_out * h)
                start = i * ctx.chunk_size
                end = start + g.size(0)
                grad_w += (g.t() @ (hidden[start:end] * grad_out[start:end]).to(ctx.dtype)).float()
        return (grad_h * grad_out).to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "sum",
    chunk_size: int = 0,
    z_loss: float = 0.0,
    vocab_size: int | None = None,
):
    """NLL of labels under softmax(hidden @ weight.T). hidden [..., D], weight [V, D], labels [...] (-100 ignored).
    vocab_size: the real tokens, the first rows of weight (None: all V); the softmax is over those only.

    reduction "sum" -> scalar fp32 sum over labelled tokens; "none" -> fp32 NLL shaped like labels (0 where
    ignored). chunk_size: tokens per chunk (0 = auto). Equal to F.cross_entropy on the full logits, with the
    same gradients (tested), at a fraction of the memory and time.
    z_loss > 0 (reduction "sum"): (NLL + z_loss x Σ lse^2, NLL, Σ lse^2), the last two detached; the gradient is
    the total's (tested against autograd on the full logits).
    """
    _check(reduction, z_loss)
    shape = labels.shape
    hidden, labels = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
    chunk = chunk_size or auto_chunk_size(hidden.size(0), weight.size(0), hidden.device)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    vocab = weight.size(0) if vocab_size is None else vocab_size
    out = _LinearCrossEntropy.apply(
        hidden, weight, labels, chunk, reduction, need_grad, weight.requires_grad, z_loss, vocab
    )
    return out if reduction == "sum" else out.view(shape)


def logits_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum", z_loss: float = 0.0):
    """The same as `linear_cross_entropy` (its reductions, its z_loss triple) from full logits [..., V]: the path of
    a head that cannot be fused (soft-capped logits)."""
    _check(reduction, z_loss)
    logits = logits.float()
    nll = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view_as(labels)
    if not z_loss:
        return nll.sum() if reduction == "sum" else nll
    z = torch.where(labels != IGNORE_INDEX, logits.logsumexp(-1).square(), 0.0).sum()
    total = nll.sum()
    return total + z_loss * z, total.detach(), z.detach()


def _check(reduction: str, z_loss: float) -> None:
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    if z_loss and reduction != "sum":
        raise ValueError(f"z_loss needs reduction='sum', got {reduction!r}")
