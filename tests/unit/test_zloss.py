"""task.objective.z_loss: the loss is the mean NLL plus z_loss x the mean squared log-sum-exp of the logits over
labelled tokens (hand-computed in float64); the fused head + loss computes it in its chunked pass with the value
and gradients of autograd on the full logits; the logged `loss` stays the NLL of the fused path, bit for bit."""

from __future__ import annotations

import pytest
import torch

from llm.errors import ConfigError
from llm.model import build_gpt
from llm.model.fused_loss import linear_cross_entropy
from llm.train import LanguageModeling


def _batch(vocab: int = 40):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 9))
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100  # ignored tokens take no part
    return {"input_ids": ids[:, :-1], "labels": labels}


def _unfused(model, batch, z_loss):
    """The definition on the full fp32 logits through autograd (what the objective computed before the fused
    kernel had the z term): mean NLL + z_loss x mean lse^2 over the labelled tokens."""
    logits = model(batch["input_ids"]).float()
    valid = batch["labels"] != -100
    lse = logits.logsumexp(-1)[valid]
    nll = (lse - logits.gather(-1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1)[valid]).mean()
    z = lse.square().mean()
    return nll + z_loss * z, nll, z


def test_z_loss_against_a_hand_computation():
    model = build_gpt(vocab_size=40, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16)
    batch = _batch()
    loss, metrics = LanguageModeling(z_loss=0.1).loss(model, batch)
    labels = batch["labels"]
    with torch.no_grad():
        logits = model(batch["input_ids"]).double()[labels != -100]  # [N, V]: the real vocabulary (40 of the 64 rows)
    lse = logits.logsumexp(-1)
    nll = (lse - logits.gather(1, labels[labels != -100][:, None]).squeeze(1)).mean()
    assert loss.item() == pytest.approx((nll + 0.1 * lse.square().mean()).item(), abs=1e-5)
    assert metrics["z_loss"].item() == pytest.approx(lse.square().mean().item(), abs=1e-4)
    plain, plain_metrics = LanguageModeling().loss(model, batch)  # the fused head + loss, no z term
    assert torch.equal(metrics["loss"], plain_metrics["loss"]) and "z_loss" not in plain_metrics
    loss.backward()  # it trains: gradients reach the embedding through the z term too
    assert model.tok_emb.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="task.objective.z_loss"):
        LanguageModeling(z_loss=-1)


@pytest.mark.parametrize("softcap", [None, 30.0])  # None: the fused head; 30: soft-capped logits, the full-logits path
def test_z_loss_equals_autograd_on_the_full_logits(softcap):
    torch.manual_seed(0)
    kw = {"logit_softcap": softcap} if softcap else {}
    model = build_gpt(
        vocab_size=40, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16, tie_embeddings=False, **kw
    )
    batch = _batch()
    loss, metrics = LanguageModeling(loss_chunk_size=5, z_loss=0.3).loss(model, batch)  # 16 tokens: 4 chunks
    got = torch.autograd.grad(loss, list(model.parameters()))
    want_loss, want_nll, want_z = _unfused(model, batch, 0.3)
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(metrics["loss"], want_nll.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(metrics["z_loss"], want_z.detach(), rtol=0, atol=1e-5)
    assert not metrics["loss"].requires_grad and not metrics["z_loss"].requires_grad
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [0, 4, 7])
def test_fused_z_loss_kernel(chunk_size):
    """The kernel alone: value, and gradients of hidden and weight under an upstream gradient, against autograd;
    z_loss=0 returns exactly what the call without it does (the same scalar, the same gradients)."""
    torch.manual_seed(0)
    h = torch.randn(2, 9, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    total, nll, z = linear_cross_entropy(h, w, labels, "sum", chunk_size, z_loss=0.05)
    logits = (h @ w.t()).flatten(0, 1)
    valid = labels.flatten() != -100
    lse = logits.logsumexp(-1)[valid]
    ref_nll = torch.nn.functional.cross_entropy(logits, labels.flatten(), reduction="sum")
    ref_z = lse.square().sum()
    torch.testing.assert_close(nll, ref_nll.detach())
    torch.testing.assert_close(z, ref_z.detach())
    got = torch.autograd.grad(total, (h, w), torch.tensor(0.37))
    want = torch.autograd.grad(ref_nll + 0.05 * ref_z, (h, w), torch.tensor(0.37))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)
    plain = linear_cross_entropy(h, w, labels, "sum", chunk_size)
    assert torch.equal(linear_cross_entropy(h, w, labels, "sum", chunk_size, z_loss=0.0), plain)
    assert torch.equal(nll, plain.detach())
    with pytest.raises(ValueError, match="z_loss needs reduction='sum'"):
        linear_cross_entropy(h, w, labels, "none", chunk_size, z_loss=0.05)


def test_fused_z_loss_under_bf16_autocast():
    """The CUDA training path (bf16 matmuls, fp32 softmax and lse), exercised with CPU autocast."""
    torch.manual_seed(0)
    h = torch.randn(3, 10, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    labels = torch.randint(0, 64, (3, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _, _ = linear_cross_entropy(h, w, labels, chunk_size=8, z_loss=0.01)
        logits = (h @ w.t()).float()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    ref = ref + 0.01 * logits.logsumexp(-1).square().sum()
    torch.testing.assert_close(total, ref, rtol=1e-2, atol=1e-2)
    for g, r in zip(torch.autograd.grad(total, (h, w)), torch.autograd.grad(ref, (h, w))):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=3e-2, atol=3e-2)
