"""A mixture-of-experts policy keeps balancing under DPO and GRPO: the router terms of the policy's own forward
(not the reference's, not the sampling's) join the loss and the log, as in pretraining; a dense model's DPO and
GRPO losses are untouched."""

from __future__ import annotations

import pytest
import torch

from llm.data import PromptData, VerifiableTasks
from llm.model import build_gpt, router_terms
from llm.peft import LoRAConfig, adapters_disabled, apply_lora
from llm.train.grpo import GRPO
from llm.train.objectives import DPO, preference_loss

MOE = {"num_experts": 4, "experts_per_token": 2, "z_loss_coef": 0.1, "aux_loss_coef": 0.5}


def _gpt(moe=MOE, vocab: int = 50, seq: int = 16):
    torch.manual_seed(0)
    return build_gpt(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, d_model=16, max_seq_len=seq, moe=moe).train()


def _pairs() -> dict:
    g, batch = torch.Generator().manual_seed(1), {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, 50, (3, 12), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, :5] = -100  # the prompt
        batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
    batch["ref_chosen_logp"], batch["ref_rejected_logp"] = torch.full((3,), -30.0), torch.full((3,), -31.0)
    return batch


def _routers(model) -> list[torch.Tensor]:
    return [b.mlp.router.weight for b in model.blocks]


def test_dpo_adds_the_policys_router_terms_and_their_gradient_reaches_the_router():
    model, batch = _gpt(), _pairs()
    loss, metrics = DPO(beta=0.5).loss(model, batch)  # the precomputed reference: the log-probs in the batch
    assert {"moe/aux_loss", "moe/router_z_loss", "moe/load_imbalance", "moe/dropped_tokens"} <= set(metrics)
    full = torch.autograd.grad(loss, _routers(model))
    chosen, rejected = DPO._logps(model, batch)  # by hand: the preference loss and the routing's penalty
    penalty, router = router_terms(model, model.config.moe)
    pref, _ = preference_loss(chosen, rejected, batch["ref_chosen_logp"], batch["ref_rejected_logp"], 0.5, "sigmoid")
    torch.testing.assert_close(loss, pref + penalty, rtol=0, atol=1e-6)
    assert metrics["loss"] == pref.detach() and metrics["moe/aux_loss"] == router["moe/aux_loss"]  # `loss`: DPO's
    by_pref = torch.autograd.grad(pref, _routers(model), retain_graph=True)
    by_penalty = torch.autograd.grad(penalty, _routers(model))
    for f, p, q in zip(full, by_pref, by_penalty):
        assert q.abs().sum() > 0
        torch.testing.assert_close(f, p + q, rtol=0, atol=1e-6)


def test_dpo_lora_reference_forward_does_not_replace_the_policys_routing():
    """reference=live with LoRA: the reference is the same model with its adapters off, run after the policy; the
    penalty and the logged routing are still the policy's."""
    model = apply_lora(_gpt(), LoRAConfig(rank=2, target_modules=["qkv"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, 2.0)  # adapters that change the routing
    batch, objective = _pairs(), DPO(reference="live")
    objective.setup(model, None)
    loss, metrics = objective.loss(model, batch)
    DPO._logps(model, batch)
    penalty, policy = router_terms(model, model.config.moe)
    with torch.no_grad(), adapters_disabled(model):
        DPO._logps(model, batch)
    _, reference = router_terms(model, model.config.moe)
    assert policy["moe/aux_loss"] != reference["moe/aux_loss"]  # the two forwards route differently
    assert metrics["moe/aux_loss"] == policy["moe/aux_loss"]
    torch.testing.assert_close(loss - metrics["loss"], penalty, rtol=0, atol=1e-6)


def test_dense_dpo_loss_is_the_preference_loss_alone():
    model, batch = _gpt(moe=None), _pairs()
    loss, metrics = DPO(beta=0.5).loss(model, batch)
    chosen, rejected = DPO._logps(model, batch)
    pref, want = preference_loss(chosen, rejected, batch["ref_chosen_logp"], batch["ref_rejected_logp"], 0.5, "sigmoid")
    assert torch.equal(loss, pref) and metrics.keys() == want.keys()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    rows = VerifiableTasks(tasks=["count"], num_examples=4)
    data = PromptData(tiny_tokenizer, rows, VerifiableTasks(split="heldout", tasks=["count"], num_examples=2))
    return data.prepare()


@pytest.mark.parametrize("moe", [{**MOE, "balance": "aux_free"}, None])
def test_grpo_adds_the_router_terms_of_its_training_forward_only(prompts, moe):
    """Sampling, pi_old's (inner_steps=2) and the reference's (beta > 0) log-probs run without gradient in
    `prepare`: no load counted for aux_free; the loss's forward counts once and its terms join the loss."""
    model = _gpt(moe, vocab=len(prompts.tokenizer), seq=128)
    objective = GRPO(
        rewards=[{"_target_": "tests.unit.test_grpo.chars"}], group_size=2, max_new_tokens=4, beta=0.1, inner_steps=2
    )
    objective.setup(model, prompts)
    batch = objective.prepare(model, prompts.train.collate([prompts.train[i] for i in range(2)]), step=0)
    layers = [b.mlp for b in model.blocks if b.sparse]
    assert all(m.step_load.sum() == 0 for m in layers)
    loss, metrics = objective.loss(model, batch)
    if moe is None:
        assert torch.equal(loss, metrics["loss"]) and not any(k.startswith("moe/") for k in metrics)
        return
    penalty, router = router_terms(model, model.config.moe)
    assert penalty.requires_grad and metrics["moe/aux_loss"] == router["moe/aux_loss"]
    torch.testing.assert_close(loss, metrics["loss"] + penalty, rtol=0, atol=1e-6)
    assert all(m.step_load.sum() == batch["input_ids"].numel() * 2 for m in layers)  # k = 2 per token
