"""µP (model.parametrization=mup): the per-group lr multipliers against µP's table, the standard parametrization
exactly at width == base_width, the init / attention / output scales away from it, and export to transformers with
the multipliers folded into the weights (same logits)."""

from __future__ import annotations

import pytest
import torch

from llm.checkpoint.files import check_compatible
from llm.errors import ConfigError
from llm.hf import save_hf
from llm.model import GPT, GPTConfig
from llm.train import MuonConfig, OptimizerConfig

SMALL = {"vocab_size": 64, "n_layer": 2, "n_head": 2, "n_kv_head": 1, "max_seq_len": 16}


def model(d_model=32, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, "d_model": d_model, **kw}))


def lrs_by_param(opt, m: GPT) -> dict[str, float]:
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {name: lr[id(p)] for name, p in m.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
def test_adamw_multipliers_follow_the_mup_table(tie):
    """m = 4: the block matrices (hidden weights) at lr / m; embedding, LM head, norms at lr (the head's 1/m is the
    output multiplier)."""
    m = model(64, parametrization="mup", base_width=16, tie_embeddings=tie)
    lrs = lrs_by_param(OptimizerConfig(lr=0.01).build(m, "cpu"), m)
    for name, lr in lrs.items():
        hidden = name.startswith("blocks.") and name.endswith(
            ("qkv.weight", "proj.weight", "up.weight", "gate.weight", "down.weight")
        )
        assert lr == pytest.approx(0.01 / 4 if hidden else 0.01), name
    assert {n for n in lrs if lrs[n] < 0.01} and "tok_emb.weight" in lrs and ("lm_head.weight" in lrs) != tie


@pytest.mark.parametrize("adjust,mult", [("match_rms_adamw", 0.5), ("original", 1.0)])
def test_muon_multipliers(adjust, mult):
    """Muon's block matrices: 1/sqrt(m) with match_rms_adamw (spectral norm of its update ~ sqrt(width)), 1 with
    `original`; its AdamW groups (embedding, norms) unscaled."""
    m = model(64, parametrization="mup", base_width=16)
    opt = MuonConfig(lr=0.02, adam_lr=0.004, adjust_lr=adjust).build(m, "cpu")
    lrs = lrs_by_param(opt, m)
    assert lrs["blocks.0.attn.qkv.weight"] == pytest.approx(0.02 * mult)
    assert lrs["tok_emb.weight"] == lrs["blocks.1.norm1.weight"] == 0.004


def test_mup_at_base_width_is_sp_exactly():
    """base_width == d_model (or unset): the same init, logits and first steps as SP, bit for bit, AdamW and Muon."""
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for optim in (OptimizerConfig(lr=0.01, warmup_steps=0), MuonConfig(lr=0.02, warmup_steps=0)):
        runs = []
        for kw in ({}, {"parametrization": "mup", "base_width": 32}):
            m = model(32, qk_norm=True, **kw)
            opt = optim.build(m, "cpu")
            logits = [m(x)]
            for _ in range(3):
                m(x, labels=x).backward()
                opt.step()
                opt.zero_grad()
            logits.append(m(x))
            runs.append(logits)
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert GPTConfig(**SMALL, d_model=32, parametrization="mup").width_mult == 1  # base_width null: d_model


def test_mup_scales_away_from_base_width():
    """m = 4: block matrices start at init_std / 2, attention scale hd^-1/2 / 2, logits / 4 (the embedding as SP)."""
    m = model(256, parametrization="mup", base_width=64, init_std=0.02)
    assert m.config.width_mult == 4
    assert m.blocks[0].mlp.up.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert m.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.scale == pytest.approx(128**-0.5 / 2)
    sp = model(256)
    sp.load_state_dict(m.state_dict())
    for block in sp.blocks:
        block.attn.scale = 128**-0.5 / 2
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():  # the head is linear: µP's logits are SP's (same weights, same attention) / m
        torch.testing.assert_close(m(x), sp(x) / 4, rtol=1e-4, atol=1e-6)


def test_coordinate_check_is_flat_under_mup_only(tmp_path):
    """The coordinate check on tiny widths (32-128, one layer, four AdamW steps): under µP every layer's mean |x|
    has a slope against width near 0 after the steps, under SP the block outputs grow about linearly or faster."""
    from llm.bench.coord import coord_check, parse

    args = parse(
        ["--out", str(tmp_path), "--widths", "32", "64", "128", "--layers", "1", "--heads", "2"]
        + ["--steps", "4", "--seq", "8", "--batch", "1", "--seeds", "1"]
    )
    slopes = coord_check(args)["slopes"]
    mup, sp = slopes["mup"][-1], slopes["sp"][-1]
    assert max(abs(v) for v in mup.values()) < 0.3, mup
    assert min(sp[k] for k in ("block0.attn", "block0.mlp", "block0")) > 1.0, sp


def test_checkpoints_keep_the_parametrization():
    """A µP checkpoint is not loadable as SP (or at another base width); one from before the keys existed is SP."""
    sp = GPTConfig(**SMALL, d_model=32).to_dict()
    mup = GPTConfig(**SMALL, d_model=32, parametrization="mup", base_width=16).to_dict()
    with pytest.raises(ConfigError, match="parametrization: checkpoint 'mup' vs model 'sp'"):
        check_compatible(mup, sp, "init_from", "ckpt")
    old = {k: v for k, v in sp.items() if k not in ("parametrization", "base_width")}
    check_compatible(old, sp, "init_from", "ckpt")


def test_adapter_export_of_a_mup_model_is_refused_in_one_line():
    """LoRA adapters sit on the projections that the export folds µP's scales into: the family check refuses."""
    from llm.hf.convert import family_of

    with pytest.raises(ConfigError, match="model.parametrization=mup: LlamaForCausalLM needs model.parametrization=sp"):
        family_of(GPTConfig(**SMALL, d_model=32, parametrization="mup", base_width=16))


transformers = pytest.importorskip("transformers")

EXPORTS = {
    "llama": {},
    "qwen3-qk-norm": {"qk_norm": True},
    "gpt2": {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
}


@pytest.mark.parametrize("arch", EXPORTS)
def test_mup_export_gives_transformers_equal_logits(tiny_tokenizer, tmp_path, arch):
    """The output multiplier folded into the final norm, 1/d attention into the queries (q rows of the projection,
    or the q-norm's weight with QK-norm): transformers computes our µP model's logits."""
    from transformers import AutoModelForCausalLM

    V = len(tiny_tokenizer)
    m = model(64, vocab_size=V, n_head=2, n_kv_head=2, parametrization="mup", base_width=16, **EXPORTS[arch])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # away from the init, so that every scale shows in the logits
    save_hf(m.eval(), tiny_tokenizer, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x)[..., :V], rtol=0, atol=1e-4)


def test_sweep_prints_the_lr_for_the_target_width(tmp_path):
    """A µP sweep's best job (hparams_search=mup): the overrides that train the target width with its lrs."""
    import yaml

    from llm.sweep.summary import mup_transfer

    (tmp_path / ".hydra").mkdir()
    config = {"model": {"d_model": 128, "parametrization": "mup", "base_width": 128}, "optim": {"lr": 0.0123}}
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    transfer = mup_transfer(tmp_path, 512)
    assert transfer["overrides"] == [
        "model.d_model=512",
        "model.parametrization=mup",
        "model.base_width=128",
        "optim.lr=0.0123",
    ]
    assert "0.25 x optim.lr under AdamW" in transfer["line"]
    config["model"]["parametrization"] = "sp"
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    assert mup_transfer(tmp_path, 512) is None


@pytest.mark.parametrize(
    ("optim", "experts", "router"), [("adamw", "", ""), ("muon", "muon", "adamw"), ("muon", "adamw", "muon")]
)
def test_moe_router_and_experts_take_the_hidden_multiplier(optim, experts, router):
    """An MoE's router [E, D] and stacked experts grow in fan-in with the width like the block matrices: at m = 4
    each at the hidden multiplier of the optimizer that trains it (optim.experts, optim.router): Muon's lr / 2 with
    match_rms_adamw, AdamW's lr / 4."""
    moe = {"num_experts": 4, "experts_per_token": 2}
    m = model(64, parametrization="mup", base_width=16, moe=moe)
    if optim == "adamw":
        lrs, expert, gate = lrs_by_param(OptimizerConfig(lr=0.01).build(m, "cpu"), m), 0.01 / 4, 0.01 / 4
    else:
        cfg = MuonConfig(lr=0.02, adam_lr=0.004, adjust_lr="match_rms_adamw", experts=experts, router=router)
        lrs, muon, adam = lrs_by_param(cfg.build(m, "cpu"), m), 0.02 / 2, 0.004 / 4
        expert, gate = (muon if experts == "muon" else adam), (muon if router == "muon" else adam)
    assert lrs["blocks.0.mlp.experts.gate"] == pytest.approx(expert)
    assert lrs["blocks.0.mlp.router.weight"] == pytest.approx(gate)
