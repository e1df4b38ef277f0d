"""optim=muon with a mixture-of-experts model: `optim.experts` (muon | adamw) and `optim.router` (adamw | muon) put
the routed experts' stacks and the router gates in the chosen optimizer's group, each choice trains, a dense model's
groups do not depend on them, and a checkpoint saved under one choice is refused in one line by a resume under
another (the optimizer state's layout differs)."""

from __future__ import annotations

import itertools

import pytest
import torch

from llm.checkpoint.files import load_optimizer, save_checkpoint
from llm.errors import ConfigError
from llm.model import build_gpt
from llm.train import MuonConfig

TINY = dict(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, d_model=16, max_seq_len=16)
MOE = {"num_experts": 4, "experts_per_token": 2, "expert_hidden": 8}
CHOICES = list(itertools.product(("muon", "adamw"), ("adamw", "muon")))  # (experts, router)


def _model(moe=MOE):
    torch.manual_seed(0)
    return build_gpt(**TINY, moe=moe)


def _groups(model, opt) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}


@pytest.mark.parametrize(("experts", "router"), CHOICES)
def test_each_choice_puts_experts_and_router_in_its_optimizer_and_trains(experts, router):
    model = _model()
    opt = MuonConfig(lr=0.02, adam_lr=0.01, weight_decay=0.1, experts=experts, router=router).build(model, "cpu")
    groups = _groups(model, opt)
    stacks = {n for n, p in model.named_parameters() if p.dim() == 3}
    gates = {n for n in dict(model.named_parameters()) if n.endswith("router.weight")}
    assert len(stacks) == 6 and len(gates) == 2
    assert (stacks <= groups["muon"]) == (experts == "muon")
    assert (stacks == groups.get("adam_experts")) == (experts == "adamw")
    assert (gates <= groups["muon"]) == (router == "muon")
    assert (gates == groups.get("adam")) == (router == "adamw")  # a tied head: the routers are AdamW's `adam` group
    by_name = {g["name"]: g for g in opt.param_groups}
    if experts == "adamw":  # AdamW's lr, the block matrices' decay (as under Muon and optim=adamw)
        assert by_name["adam_experts"]["lr"] == 0.01 and by_name["adam_experts"]["weight_decay"] == 0.1
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in stacks | gates}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], labels=ids[:, 1:]).backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(not torch.equal(v, after[n]) and torch.isfinite(after[n]).all() for n, v in before.items())


def test_a_dense_model_has_the_same_groups_whatever_the_keys_say():
    model = _model(moe=None)
    layouts = {
        tuple((g["name"], len(g["params"])) for g in MuonConfig(experts=e, router=r).build(model, "cpu").param_groups)
        for e, r in CHOICES
    }
    assert layouts == {(("muon", 10), ("adam_no_decay", 6))}


@pytest.mark.parametrize("key", ["experts", "router"])
def test_a_bad_value_is_one_line_naming_the_choices(key):
    with pytest.raises(ConfigError, match=rf"^optim\.{key}='sgd' is not allowed; choose one of \['adamw', 'muon'\]"):
        MuonConfig(**{key: "sgd"})


def test_a_resume_under_another_choice_is_refused_in_one_line(tmp_path):
    model = _model()
    saved = MuonConfig().build(model, "cpu")  # experts on Muon, router on AdamW
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], labels=ids[:, 1:]).backward()
    saved.step()
    save_checkpoint(tmp_path / "ckpt", model, saved, {}, model.config.to_dict())
    load_optimizer(tmp_path / "ckpt", MuonConfig().build(model, "cpu"))  # the same choice: resumes
    for experts, router in CHOICES[1:]:
        with pytest.raises(ConfigError, match=r"^resume: the optimizer state in .* has parameter groups \[\('muon'"):
            load_optimizer(tmp_path / "ckpt", MuonConfig(experts=experts, router=router).build(model, "cpu"))
