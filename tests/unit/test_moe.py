"""The mixture-of-experts block (llm/model/moe.py): dropless dispatch equals a per-token loop, the grouped and loop
paths agree, the load-balancing loss equals transformers', the aux-loss-free bias balances a skewed router and
resumes exactly, and activation checkpointing counts each token once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm.checkpoint.files import check_compatible
from llm.errors import ConfigError
from llm.model import GPTConfig, build_gpt, router_terms, update_router_bias
from llm.model.moe import MoE, parse_moe
from llm.tasks.source import ModelSource, open_source
from llm.train import LanguageModeling
from tests.conftest import compose_config


def _moe(**kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(16, 24, parse_moe({"num_experts": 4, "experts_per_token": 2, **kw}, 2))
    for module in (m.router, m.experts):
        module.init_weights(0.3, 1.0)
    if m.shared is not None:
        for lin in (m.shared.gate, m.shared.up, m.shared.down):
            nn.init.normal_(lin.weight, 0.0, 0.3)
    return m


def _reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: its k experts' SwiGLU outputs, weighted, summed (plus the shared experts)."""
    rows = []
    for t in x.reshape(-1, x.size(-1)):
        _, _, chosen, weights = m.router(t[None])
        y = torch.zeros_like(t)
        for e, w in zip(chosen[0].tolist(), weights[0]):
            ex = m.experts
            y = y + w * F.linear(F.silu(F.linear(t, ex.gate[e])) * F.linear(t, ex.up[e]), ex.down[e])
        rows.append(y + (m.shared(t) if m.shared is not None else 0))
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize(
    "kw",
    [
        {"dispatch": "loop"},
        {"dispatch": "grouped", "score": "sigmoid", "shared_experts": 1},
        {"dispatch": "grouped", "norm_topk": False, "balance": "aux_free"},
    ],
)
def test_dispatch_equals_a_per_token_loop(kw):
    m = _moe(**kw)
    if m.router.bias is not None:
        m.router.bias.copy_(torch.tensor([0.3, -0.1, 0.0, -0.2]))  # changes which experts are picked
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(m(x), _reference(m, x), rtol=0, atol=1e-5)
    assert m.stats["dropped"].item() == 0 and m.stats["counts"].sum().item() == 3 * 5 * 2


def test_grouped_and_loop_paths_agree_forward_and_backward():
    loop, grouped = _moe(dispatch="loop"), _moe(dispatch="grouped")
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(4, 7, 16)
    x[0, :3] = x[0, 3]  # several tokens on the same experts; with 4 experts some may get none
    outs = []
    for m in (loop, grouped):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * torch.randn_like(y, generator=torch.Generator().manual_seed(1))).sum().backward()
        outs.append((y.detach(), xi.grad, *[p.grad for p in m.parameters()]))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_aux_loss_equals_transformers_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layers = nn.ModuleList([_moe(), _moe()])
    with torch.no_grad():
        layers[1].router.weight.mul_(-2.0)
    logits = []
    for layer in layers:
        x = torch.randn(2, 9, 16)
        layer(x)
        logits.append(F.linear(x.reshape(-1, 16), layer.router.weight))
    cfg = parse_moe({"num_experts": 4, "experts_per_token": 2, "z_loss_coef": 0.5}, 2)
    penalty, metrics = router_terms(layers, cfg)
    want = load_balancing_loss_func(tuple(logits), 4, 2)
    torch.testing.assert_close(metrics["moe/aux_loss"], want, rtol=0, atol=1e-6)
    z = torch.stack([lg.logsumexp(-1).square().mean() for lg in logits]).mean()
    torch.testing.assert_close(penalty, 0.01 * want + 0.5 * z, rtol=0, atol=1e-6)
    counts = torch.stack([layer.stats["counts"] for layer in layers])
    imbalance = (counts.max(-1).values / counts.mean(-1)).mean()
    assert metrics["moe/load_imbalance"] == imbalance and metrics["moe/dropped_tokens"] == 0


def _skewed(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    m = MoE(16, 24, parse_moe({"num_experts": 4, "experts_per_token": 1, "balance": "aux_free", "dispatch": "loop"}, 1))
    m.experts.init_weights(0.02, 1.0)
    m.rate = 0.01
    with torch.no_grad():  # the inputs share some of feature 0 (below), by which the router favours expert 0
        m.router.weight.normal_(0.0, 1.0)
        m.router.weight[0, 0] += 2.0
    return m


def _bias_steps(m: MoE, steps: int, seed: int) -> list[float]:
    """A training forward on 128 tokens and the aux_free update, no optimizer: the imbalance of each step."""
    g = torch.Generator().manual_seed(seed)
    layers, cfg = nn.ModuleList([m]), parse_moe({"balance": "aux_free"}, 1)
    out = []
    for _ in range(steps):
        x = torch.randn(128, 16, generator=g)
        x[:, 0] += 1.0
        m(x)
        m.record_load()
        out.append(router_terms(layers, cfg)[1]["moe/load_imbalance"].item())
        update_router_bias(layers)
    return out


def test_aux_free_bias_balances_a_skewed_router_and_resumes_exactly():
    m = _skewed()
    imbalance = _bias_steps(m, 60, seed=1)  # max / mean tokens per expert: 1 is balanced, 4 all on one
    bias = m.router.bias
    assert sum(imbalance[:5]) / 5 > 1.8 and sum(imbalance[-10:]) / 10 < 1.45, imbalance
    assert abs(bias.sum().item()) < 1e-5 and bias[0] < bias[1:].min()  # centred; the favoured expert pushed down
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    assert "router.bias" in saved and "step_load" not in saved  # the bias is checkpointed, the step's load not
    after = _bias_steps(m, 5, seed=2)
    resumed = _skewed(seed=3)
    resumed.load_state_dict(saved)
    assert _bias_steps(resumed, 5, seed=2) == after and torch.equal(resumed.router.bias, m.router.bias)
    kept = m.router.bias.clone()
    m.step_load += torch.tensor([9.0, 0, 0, 0])
    update_router_bias(m, torch.tensor(1.0))  # a skipped step leaves the bias, and clears the load
    assert torch.equal(m.router.bias, kept) and m.step_load.sum() == 0


def test_activation_checkpointing_same_gradients_and_one_count():
    moe = {"num_experts": 4, "experts_per_token": 2, "balance": "aux_free", "z_loss_coef": 0.1, "layers": [1]}
    grads, loads = [], []
    for ac in (False, True):
        torch.manual_seed(0)
        model = build_gpt(vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16, moe=moe)
        model.train()
        for block in model.blocks:
            block.activation_checkpointing = ac
        ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(5))
        loss, metrics = LanguageModeling().loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
        loads.append(model.blocks[1].mlp.step_load.clone())
        assert metrics["moe/router_z_loss"] > 0 and not isinstance(model.blocks[0].mlp, MoE)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(loads[0], loads[1]) and loads[0].sum() == 2 * 12 * 2


@pytest.mark.parametrize(
    ("moe", "match"),
    [
        ({"num_experts": 4, "experts_per_token": 5}, "model.moe.experts_per_token"),
        ({"balance": "switch"}, "model.moe.balance"),
        ({"layers": [0, 7]}, r"model.moe.layers=\[0, 7\]"),
        ({"top_k": 2}, r"unknown model.moe key\(s\) \['top_k'\]"),
        ({"dispatch": "fast"}, "model.moe.dispatch"),
    ],
)
def test_bad_moe_keys_are_one_line(moe, match):
    with pytest.raises(ConfigError, match=match):
        build_gpt(vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, d_model=16, moe=moe)
    with pytest.raises(ConfigError, match="model.moe needs model.mlp=swiglu"):
        build_gpt(vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, d_model=16, mlp="gelu", moe={})


def test_init_from_keeps_a_nested_moe_override(monkeypatch, tmp_path):
    """init_from an MoE checkpoint: its model.moe replaces the preset's (here the default dense model's), but
    model.moe.<key> given on the command line applies on it (a coefficient trains on; an architecture key is refused
    by check_compatible); over a dense source's moe=null it is one ConfigError naming it."""
    moe = {"num_experts": 4, "aux_loss_coef": 0.02}
    saved = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16, moe=moe)
    source = ModelSource(tmp_path, False, saved.to_dict())
    monkeypatch.setattr(ModelSource, "resolve", classmethod(lambda cls, value, key="init_from": source))
    overrides = [f"init_from={tmp_path}", "+model.moe.aux_loss_coef=0.5", "+model.moe.num_experts=2"]
    explicit = {o.split("=")[0].lstrip("+") for o in overrides}
    cfg = compose_config(overrides)
    open_source(cfg, explicit)
    moe = cfg.model.moe
    assert moe.aux_loss_coef == 0.5 and moe.num_experts == 2 and moe.experts_per_token == saved.moe["experts_per_token"]
    now = {**saved.to_dict(), "moe": {**saved.moe, "aux_loss_coef": 0.5}}
    check_compatible(saved.to_dict(), now, "init_from", tmp_path)  # a training coefficient: no weight depends on it
    with pytest.raises(ConfigError, match="incompatible model .moe: checkpoint"):
        check_compatible(saved.to_dict(), {**now, "moe": {**now["moe"], "num_experts": 2}}, "init_from", tmp_path)
    source.config = {**saved.to_dict(), "moe": None}
    with pytest.raises(ConfigError, match="model.moe.aux_loss_coef: init_from's model has model.moe=None"):
        open_source(compose_config(overrides), explicit)


def test_compiled_moe_model_gives_the_eager_numbers():
    """torch.compile (trainer.compile) traces the model with the dispatch left eager: the grouped matmul's fake
    tensors refused fp32 before. Dynamo only (backend=eager) keeps this cheap; inductor, through run.py, is the slow
    test in tests/integration/test_moe_run.py."""
    moe = {"num_experts": 4, "experts_per_token": 2, "balance": "aux_free", "z_loss_coef": 0.1}
    torch.manual_seed(0)
    model = build_gpt(vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16, moe=moe).train()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(5))
    runs = []
    for m in (model, torch.compile(model, backend="eager")):
        loss, metrics = LanguageModeling().loss(m, {"input_ids": ids, "labels": ids})
        loss.backward()
        load = model.blocks[0].mlp.step_load
        runs.append((loss.detach(), metrics, [p.grad.clone() for p in model.parameters()], load.clone()))
        model.zero_grad()
        load.zero_()
    (l0, m0, g0, load0), (l1, m1, g1, load1) = runs
    assert torch.equal(l0, l1) and m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1)) and torch.equal(load0, load1) and load0.sum() == 2 * 12 * 2
