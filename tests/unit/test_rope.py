"""RoPE length extrapolation: parity with transformers' RoPE init functions, factor 1 is plain RoPE, rotations stay
rotations, config composition, long forward passes, generation past the limit (warning, KV cache)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from llm.errors import ConfigError
from llm.model import GPT, GPTConfig
from llm.model.rope import RotaryEmbedding, apply_rotary, default_inv_freq, rope_parameters
from tests.conftest import compose_config

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIMS, THETAS, FACTORS = (16, 32, 64, 128), (10000.0, 500000.0), (1.0, 2.0, 4.0, 8.0)
GRID = [(d, t, f) for d in HEAD_DIMS for t in THETAS for f in FACTORS]
METHODS = {  # config files' defaults, original context 256
    "linear": {"type": "linear", "original_max_position_embeddings": 256},
    "ntk": {"type": "ntk", "dynamic": False, "original_max_position_embeddings": 256},
    "dynamic": {"type": "ntk", "dynamic": True, "original_max_position_embeddings": 256},
    "yarn": {
        "type": "yarn",
        "original_max_position_embeddings": 256,
        "beta_fast": 32,
        "beta_slow": 1,
        "attention_factor": None,
        "truncate": True,
    },
}


def hf(rope_type: str, head_dim: int, theta: float, max_positions: int, seq_len=None, **params):
    """transformers' (inv_freq, attention_factor) for a Llama config with these RoPE parameters."""
    cfg = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": rope_type, "rope_theta": theta, **params},
    )
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", seq_len=seq_len)


def assert_same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0].float(), rtol=2e-6, atol=0)
    assert ours[1] == pytest.approx(theirs[1], rel=1e-12)


@pytest.mark.parametrize("head_dim,theta,factor", GRID)
def test_linear_matches_transformers(head_dim, theta, factor):
    ours = rope_parameters(head_dim, theta, {"type": "linear", "factor": factor})
    assert_same(ours, hf("linear", head_dim, theta, 256, factor=factor))


@pytest.mark.parametrize("head_dim,theta,factor", GRID)
def test_dynamic_ntk_matches_transformers(head_dim, theta, factor):
    """The frequencies the model uses: RotaryEmbedding's per-call rescaling, with the length given on the host
    (seq_len hint) and read on the device from the positions."""
    rope = RotaryEmbedding(head_dim, theta, {**METHODS["dynamic"], "factor": factor})
    for seq_len in (100, 256, 3 * 256, 1000):  # HF takes the original context from max_position_embeddings
        theirs = hf("dynamic", head_dim, theta, 256, seq_len=seq_len, factor=factor)
        for hint in (seq_len, None):
            assert_same((rope._dynamic_inv_freq(torch.arange(seq_len), hint), rope.attention_factor), theirs)


@pytest.mark.parametrize("original", [256, 4096])
@pytest.mark.parametrize("head_dim,theta,factor", GRID)
def test_yarn_matches_transformers(head_dim, theta, factor, original):
    for extra in ({}, {"truncate": False}, {"beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3}):
        scaling = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original, **extra}
        theirs = hf(
            "yarn",
            head_dim,
            theta,
            int(factor * original),
            factor=factor,
            original_max_position_embeddings=original,
            **extra,
        )
        assert_same(rope_parameters(head_dim, theta, scaling), theirs)


@pytest.mark.parametrize("head_dim,theta,factor", GRID)
def test_static_ntk_closed_form(head_dim, theta, factor):
    inv_freq, attention = rope_parameters(head_dim, theta, {"type": "ntk", "factor": factor})
    base = theta * factor ** (head_dim / (head_dim - 2))
    expected = torch.tensor([base ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float32)
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert attention == 1.0
    # the lowest frequency is interpolated by exactly `factor`
    assert inv_freq[-1].item() == pytest.approx(default_inv_freq(head_dim, theta)[-1].item() / factor, rel=1e-5)


# dynamic NTK is left out: with factor 1 it still grows its base past the original context (as in HF), and up to
# it it is plain RoPE for any factor (test_dynamic_ntk_length_from_hint_or_positions)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "dynamic"])
@pytest.mark.parametrize("head_dim,theta", [(d, t) for d in HEAD_DIMS for t in THETAS])
def test_factor_one_is_plain_rope(method, head_dim, theta):
    plain = rope_parameters(head_dim, theta, None)
    scaling = {**METHODS[method], "factor": 1.0}
    ours = rope_parameters(head_dim, theta, scaling)
    torch.testing.assert_close(ours[0], plain[0], rtol=1e-6, atol=0)
    assert ours[1] == 1.0


@pytest.mark.parametrize("method", ["none", *METHODS])
def test_still_a_rotation(method):
    scaling = {"type": "none"}
    if method != "none":  # original context 16, so that 100 positions are far past it
        scaling = {**METHODS[method], "factor": 4.0, "original_max_position_embeddings": 16}
    rope = RotaryEmbedding(32, 10000.0, scaling)
    x = torch.randn(2, 3, 100, 32, dtype=torch.float64)
    cos, sin = rope(torch.arange(100), torch.float64)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), rope.attention_factor * x.norm(dim=-1))
    if method != "dynamic":  # <R_m q, R_n k> depends only on m - n
        q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)
        dot = lambda m, n: (apply_rotary(q, cos[m], sin[m]) * apply_rotary(k, cos[n], sin[n])).sum()
        torch.testing.assert_close(dot(75, 2), dot(90, 17), rtol=1e-4, atol=1e-4)  # angles are float32


def test_dynamic_ntk_length_from_hint_or_positions():
    rope = RotaryEmbedding(32, 10000.0, {**METHODS["dynamic"], "factor": 4.0})
    plain = RotaryEmbedding(32, 10000.0)
    short = torch.arange(200)
    for a, b in zip(rope(short, torch.float32), plain(short, torch.float32)):  # unscaled up to the original
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(rope(short, torch.float32, seq_len=200)[0], plain(short, torch.float32)[0])
    long = torch.arange(3 * 256)
    inv_freq = hf("dynamic", 32, 10000.0, 256, seq_len=3 * 256, factor=4.0)[0].float()
    expected = torch.outer(long.float(), inv_freq).cos()
    for cos in (
        rope(long, torch.float32)[0],
        rope(long, torch.float32, seq_len=3 * 256)[0],
        rope(long[None].expand(2, -1), torch.float32)[0][1],
    ):  # read on the device / host hint / [B, T]
        torch.testing.assert_close(cos[:, :16], expected, rtol=0, atol=1e-4)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"extrapolation\.type.*'none', 'linear', 'ntk', 'yarn'"):
        RotaryEmbedding(16, scaling={"type": "rope2"})
    for method in METHODS:
        with pytest.raises(ConfigError, match=r"extrapolation\.factor"):
            RotaryEmbedding(16, scaling={**METHODS[method], "factor": 0.5})
    for method in ("dynamic", "yarn"):
        scaling = {**METHODS[method], "factor": 2.0}
        del scaling["original_max_position_embeddings"]
        with pytest.raises(ConfigError, match="original_max_position_embeddings"):
            RotaryEmbedding(16, scaling=scaling)
    with pytest.raises(ConfigError, match="beta_fats"):
        RotaryEmbedding(16, scaling={**METHODS["yarn"], "factor": 2.0, "beta_fats": 8})


@pytest.mark.parametrize("preset", ["125m", "1b"])
@pytest.mark.parametrize(
    "option,extra", [("none", []), ("linear", []), ("ntk", []), ("ntk", ["extrapolation.dynamic=true"]), ("yarn", [])]
)
def test_extrapolation_composes_with_presets(preset, option, extra):
    cfg = compose_config([f"model={preset}", f"extrapolation={option}", *extra])
    scaling = OmegaConf.to_container(cfg.extrapolation, resolve=True)
    assert scaling["type"] == option
    if option != "none":
        assert scaling["original_max_position_embeddings"] == cfg.model.max_seq_len
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all", vocab_size=50304, rope_scaling=scaling)
    assert model.rope.scaling["type"] == option
    assert model.config.rope_scaling == scaling  # what model_config.json records
    limit = model.rope.context_limit(model.config.max_seq_len)
    assert limit == cfg.model.max_seq_len * (1 if option == "none" else 4)


def tiny(scaling: dict | None, ctx: int = 16) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=ctx, rope_scaling=scaling)
    return GPT(cfg).double().eval()


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def test_yarn_forward_at_four_times_the_context():
    model = tiny(YARN)
    with torch.no_grad():
        logits = model(torch.randint(0, 97, (2, 64)))
    assert logits.shape == (2, 64, model.config.vocab_size) and torch.isfinite(logits).all()
    assert model.rope.attention_factor == pytest.approx(0.1 * math.log(4) + 1)


@pytest.mark.parametrize(
    "scaling", [YARN, {**YARN, "type": "linear"}, {**YARN, "type": "ntk"}], ids=lambda s: s["type"]
)
def test_cached_generation_past_the_context(scaling):
    model = tiny(scaling)
    prompt = torch.randint(0, 97, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = model.generate(prompt, 40, temperature=0)  # 48 = 3x the training context of 16
        uncached = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, 48)
    assert torch.equal(cached, uncached)


def test_generation_warns_past_the_limit():
    prompt = torch.randint(0, 97, (1, 8))
    for model, limit in ((tiny(YARN), 64), (tiny(None), 16)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.generate(prompt, limit - 8, temperature=0)  # exactly at the limit: silent
        with pytest.warns(UserWarning, match=f"past the {limit}") as record:
            model.generate(prompt, limit - 7, temperature=0)
        assert len([w for w in record if "past the" in str(w.message)]) == 1  # once per call, not per step
