"""The transformer: causality, both position schemes train, GQA shapes, KV-cache generation, sampling filters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.errors import ConfigError
from llm.model import build_gpt, sample_next_token
from llm.model.fused_loss import linear_cross_entropy
from llm.model.rope import RotaryEmbedding, apply_rotary
from llm.train.objectives import cross_entropy

SMALL = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)


def small(**kw):
    torch.manual_seed(0)
    return build_gpt(**{**SMALL, **kw}).eval()


@pytest.mark.parametrize(
    "pos_emb,norm,mlp,bias", [("rope", "rmsnorm", "swiglu", False), ("learned", "layernorm", "gelu", True)]
)
def test_causal(pos_emb, norm, mlp, bias):
    model = small(pos_emb=pos_emb, norm=norm, mlp=mlp, bias=bias)
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 97  # change one future token
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_both_position_schemes_train(pos_emb):
    model = small(pos_emb=pos_emb).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # a sequence that needs positions to predict: a fixed random permutation repeated
    x = torch.randperm(97)[:33].repeat(4, 1)
    losses = []
    for _ in range(60):
        loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_gqa_shapes():
    model = small(n_head=8, n_kv_head=2)
    attn = model.blocks[0].attn
    hd = 32 // 8
    assert attn.qkv.weight.shape == ((8 + 2 * 2) * hd, 32)
    assert model(torch.randint(0, 97, (3, 7))).shape == (3, 7, 97)  # the real vocabulary, not the padded 128
    with pytest.raises(ConfigError, match="n_kv_head"):
        build_gpt(**{**SMALL, "n_head": 4, "n_kv_head": 3})


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_generate_cache_matches_no_cache(pos_emb):
    model = small(pos_emb=pos_emb)
    prompt = torch.randint(0, 97, (2, 5))
    with_cache = model.generate(prompt, 30, temperature=0, use_cache=True)
    without = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 35)
    assert torch.equal(with_cache, without)


def test_kv_cache_prefill_in_chunks_matches_full_forward():
    from llm.model import KVCache

    model = small()
    x = torch.randint(0, 97, (2, 24))
    full = model(x)
    cache = KVCache(model.config, 2, 24, "cpu", torch.float32)
    parts = [model(x[:, :10], kv_cache=cache), model(x[:, 10:11], kv_cache=cache), model(x[:, 11:], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_learned_positions_cannot_pass_their_table():
    model = small(pos_emb="learned", max_seq_len=16)
    with pytest.raises(ConfigError, match="learned position"):
        model(torch.randint(0, 97, (1, 17)))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, temperature=0).item() == 4
    top2 = {sample_next_token(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert top2 == {3, 4}
    # softmax of [0..4]: p(4)=0.636, p(3)=0.234 -> top_p=0.6 keeps only token 4, 0.8 keeps {3, 4}
    assert {sample_next_token(logits, 1.0, top_p=0.6, generator=g).item() for _ in range(100)} == {4}
    assert {sample_next_token(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(300)} == {3, 4}
    for tiny in (1e-30, 1e-45, 1e-300):  # a temperature whose logits / t overflow, or that is 0 in fp32: greedy
        assert sample_next_token(logits * 1e9, tiny, top_p=1e-300, generator=g).item() == 4


def test_generate_stops_at_eos():
    model = small()
    prompt = torch.randint(0, 97, (1, 4))
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 20, temperature=0, eos_token_id=first)
    assert out.shape[1] == 5


def test_rope_is_a_rotation():
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 3, 10, 16)
    cos, sin = rope(torch.arange(10), torch.float32)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    # relative: <R_m q, R_n k> depends only on m - n
    q, k = torch.randn(16), torch.randn(16)
    c, s = rope(torch.arange(20), torch.float32)
    dot = lambda m, n: (
        apply_rotary(q.view(1, 1, 1, 16), c[m], s[m]) * apply_rotary(k.view(1, 1, 1, 16), c[n], s[n])
    ).sum()
    torch.testing.assert_close(dot(5, 2), dot(15, 12))


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("chunk_size", [0, 4, 7, 100])
def test_fused_loss_equals_plain_cross_entropy_and_grads(reduction, chunk_size):
    torch.manual_seed(0)
    h = torch.randn(2, 9, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    plain = F.cross_entropy((h @ w.t()).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    fused = linear_cross_entropy(h, w, labels, reduction, chunk_size)
    if reduction == "sum":
        plain = plain.sum()
        upstream = torch.tensor(0.37)
    else:  # a different incoming gradient per token, as DPO's per-sequence sums give
        plain, upstream = plain.view(2, 9), torch.randn(2, 9)
        assert fused.shape == (2, 9) and bool((fused[0, :3] == 0).all())
    torch.testing.assert_close(fused, plain)
    for got, want in zip(torch.autograd.grad(fused, (h, w), upstream), torch.autograd.grad(plain, (h, w), upstream)):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # evaluation: no gradient is formed, same value
        torch.testing.assert_close(linear_cross_entropy(h, w, labels, reduction, chunk_size), plain.detach())


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_loss_under_bf16_autocast_matches_plain(reduction):
    """The CUDA training path (bf16 matmuls, fp32 softmax), exercised with CPU autocast."""
    torch.manual_seed(0)
    h = torch.randn(3, 10, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    labels = torch.randint(0, 64, (3, 10))
    upstream = torch.rand(3, 10) if reduction == "none" else torch.tensor(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h, w, labels, reduction, chunk_size=8)
        plain = F.cross_entropy((h @ w.t()).float().flatten(0, 1), labels.flatten(), reduction="none")
        plain = plain.sum() if reduction == "sum" else plain.view(3, 10)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=1e-2)
    grads = torch.autograd.grad(fused, (h, w), upstream), torch.autograd.grad(plain, (h, w), upstream)
    for got, want in zip(*grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


def test_model_loss_path_equals_logits_path():
    torch.manual_seed(0)
    model = build_gpt(vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, d_model=32, max_seq_len=16)
    x = torch.randint(0, 100, (3, 16))
    labels = x.roll(-1, 1)
    labels[:, -1] = -100
    torch.testing.assert_close(model(x, labels=labels) / 45, cross_entropy(model(x), labels))
    torch.testing.assert_close(
        model(x, labels=labels, reduction="none").sum(1),
        F.cross_entropy(model(x).transpose(1, 2), labels, reduction="none").sum(1),
    )


def test_init_scales_residual_projections():
    model = build_gpt(vocab_size=512, n_layer=8, n_head=4, n_kv_head=4, d_model=256)
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.002  # 0.02 / sqrt(2 * 8)
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is model.tok_emb.weight


# Fixed-seed fingerprints of the two default blocks, recorded before the architecture options existed: every option
# is off by default, so these models must stay the same (sum, |sum|, four logits of the last position). The sums
# are over the 97 real tokens' logits (the padded head rows' were dropped from the logits later; the same model's
# first 97 columns gave these sums before that).
FINGERPRINTS = {
    "llama": (28.81400353780373, 367.4751718073221, [0.18994443, -0.08649134, 0.02468400, -0.07423367]),
    "gpt2": (16.502283094570885, 347.55076903858935, [-0.19881304, -0.10574015, -0.15429990, 0.14405750]),
}


@pytest.mark.parametrize("kind", FINGERPRINTS)
def test_default_models_unchanged_by_the_options(kind):
    kw = {} if kind == "llama" else dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True)
    model = small(**kw)
    x = torch.arange(40).view(2, 20) * 7 % 97
    with torch.no_grad():
        y = model(x).double()
    total, absolute, last = FINGERPRINTS[kind]
    assert y.sum().item() == pytest.approx(total, rel=1e-6)
    assert y.abs().sum().item() == pytest.approx(absolute, rel=1e-6)
    torch.testing.assert_close(y[1, -1, :4], torch.tensor(last, dtype=torch.float64), rtol=0, atol=1e-6)
    assert not any("q_norm" in name or "k_norm" in name for name in model.state_dict())


def test_qk_norm_normalises_each_head():
    """QK-norm: learnable per-head RMSNorm weights [hd]; scaling the query and key projections changes nothing."""
    model = small(qk_norm=True, norm_eps=1e-10)  # an eps this small: the norm is exactly scale-free
    attn = model.blocks[0].attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (32 // 4,)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        plain = small(norm_eps=1e-10)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "_norm." not in k})
        before, plain_before = model(x), plain(x)
        q_and_k = (4 + 2) * 8  # rows of the fused qkv that are queries and keys
        for m in (model, plain):
            for block in m.blocks:
                block.attn.qkv.weight[:q_and_k] *= 7.0
        after, plain_after = model(x), plain(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain_after, plain_before, atol=1e-2)  # without QK-norm the scale matters
