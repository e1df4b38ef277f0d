"""task.objective.z_loss: the loss is the mean NLL plus z_loss x the mean squared log-sum-exp of the logits over
labelled tokens (hand-computed in float64); the logged `loss` stays the NLL of the fused path."""

from __future__ import annotations

import pytest
import torch

from llm.errors import ConfigError
from llm.model import build_gpt
from llm.train import LanguageModeling


def test_z_loss_against_a_hand_computation():
    torch.manual_seed(0)
    model = build_gpt(vocab_size=40, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16)
    ids = torch.randint(0, 40, (2, 9))
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100  # ignored tokens take no part
    batch = {"input_ids": ids[:, :-1], "labels": labels}
    loss, metrics = LanguageModeling(z_loss=0.1).loss(model, batch)
    with torch.no_grad():
        logits = model(ids[:, :-1]).double()[labels != -100]  # [N, V], the padded vocabulary rows included
    lse = logits.logsumexp(-1)
    nll = (lse - logits.gather(1, labels[labels != -100][:, None]).squeeze(1)).mean()
    assert loss.item() == pytest.approx((nll + 0.1 * lse.square().mean()).item(), abs=1e-5)
    assert metrics["z_loss"].item() == pytest.approx(lse.square().mean().item(), abs=1e-4)
    plain, plain_metrics = LanguageModeling().loss(model, batch)  # the fused head + loss
    assert metrics["loss"].item() == pytest.approx(plain.item(), abs=1e-5) and "z_loss" not in plain_metrics
    loss.backward()  # it trains: gradients reach the embedding through the z term too
    assert model.tok_emb.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="task.objective.z_loss"):
        LanguageModeling(z_loss=-1)
