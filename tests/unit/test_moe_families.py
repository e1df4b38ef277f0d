"""The mixture-of-experts families in and out, on tiny random models transformers builds and saves (fp32): Mixtral
(a sliding window), Qwen3-MoE (a dense first layer by mlp_only_layers, norm_topk_prob) and OLMoE (q/k norms over
the whole projection, clip_qkv that bites). Each: logits equal to transformers' within 1e-4 after import; the
export holds the very same per-expert tensors, and transformers loads it back as the same class with the same
logits; a model of ours with what the families lack is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llm.errors import ConfigError
from llm.hf import save_hf
from llm.hf.convert import family
from llm.model import build_gpt
from llm.tasks.source import ModelSource

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

DIMS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(num_experts_per_tok=2, tie_word_embeddings=False, max_position_embeddings=64)
CLASSES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


def hf_config(kind: str, vocab: int):
    if kind == "mixtral":
        return transformers.MixtralConfig(vocab_size=vocab, **DIMS, **MOE, num_local_experts=4, sliding_window=8)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            vocab_size=vocab,
            **DIMS,
            **MOE,
            num_experts=4,
            moe_intermediate_size=24,
            head_dim=16,
            mlp_only_layers=[0],
            norm_topk_prob=True,
            output_router_logits=True,
        )
    return transformers.OlmoeConfig(vocab_size=vocab, **DIMS, **MOE, num_experts=4, clip_qkv=0.6)


def hf_model(kind: str, tokenizer, path):
    """Every weight moved off its init; the routers' weights scaled up, so that no token's top k is a near tie
    that rounding could flip."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(kind, len(tokenizer) + 3), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("gate.weight"):
                p.mul_(20.0)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out)[..., : model.config.vocab_size]


@pytest.mark.parametrize("kind", list(CLASSES))
def test_moe_family_in_and_out(tiny_tokenizer, tmp_path, kind):
    theirs = hf_model(kind, tiny_tokenizer, tmp_path / "hf")
    model, tok = ModelSource.resolve(tmp_path / "hf").load()
    cfg = model.config
    assert cfg.family == kind and cfg.moe["num_experts"] == 4 and cfg.moe["experts_per_token"] == 2
    assert [cfg.is_sparse(i) for i in range(2)] == ([False, True] if kind == "qwen3_moe" else [True, True])
    x = torch.randint(0, theirs.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    want = logits(theirs, x)
    torch.testing.assert_close(logits(model, x), want, rtol=0, atol=1e-4)

    save_hf(model, tok, tmp_path / "back")
    before, after = (
        load_file(str(tmp_path / "hf/model.safetensors")),
        load_file(str(tmp_path / "back/model.safetensors")),
    )
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [CLASSES[kind]] and config["model_type"] == kind
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert type(back).__name__ == CLASSES[kind]
    torch.testing.assert_close(logits(back, x), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("moe", "qk", "match"),
    [
        ({"shared_experts": 1}, {}, "model.moe.shared_experts=1: Qwen3MoeForCausalLM has no shared experts"),
        ({"score": "sigmoid"}, {}, "model.moe.score=sigmoid"),
        ({"balance": "aux_free"}, {}, "model.moe.balance=aux_free: Qwen3MoeForCausalLM has no router selection bias"),
        (
            {"norm_topk": False},
            {"qk_norm": False, "family": "mixtral"},
            "model.moe.norm_topk=False: MixtralForCausalLM",
        ),
        (
            {"layers": [1]},
            {"qk_norm": False, "family": "mixtral"},
            "model.moe.layers=.1.: MixtralForCausalLM is sparse",
        ),
    ],
)
def test_export_refuses_what_the_moe_families_lack(moe, qk, match):
    model = build_gpt(vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, d_model=16, moe=moe, **{"qk_norm": True, **qk})
    with pytest.raises(ConfigError, match=match):
        family(model.config)
    ours = build_gpt(vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, d_model=16, qk_norm=True, moe={"layers": [1]})
    assert family(ours.config) == "qwen3_moe"  # our QK-norm MoE goes out as Qwen3-MoE, dense layers included
