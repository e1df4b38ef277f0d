"""Hugging Face model dirs, in-process on tiny models: our export loads in transformers and computes what we compute
(logits at 1x and 4x the training context for every RoPE scaling, greedy generation, tokenizer ids and chat
template); what cannot be represented is a one-line error naming the field. HF dirs of every family built from
configs import and export back bit for bit in test_families.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from llm.errors import ConfigError, DataError
from llm.hf import is_hf_model_dir, save_hf
from llm.model import GPT, GPTConfig
from llm.tasks.source import ModelSource

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

CTX = 16  # the training context; parity is checked at CTX and 4 x CTX
SCALINGS = {
    "none": None,
    "linear": {"type": "linear", "factor": 4.0, "original_max_position_embeddings": CTX},
    "ntk": {"type": "ntk", "factor": 4.0, "dynamic": False, "original_max_position_embeddings": CTX},
    "ntk_dynamic": {"type": "ntk", "factor": 4.0, "dynamic": True, "original_max_position_embeddings": CTX},
    "yarn": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": CTX,
        "beta_fast": 32,
        "beta_slow": 1,
        "attention_factor": None,
        "truncate": True,
    },
}
GPT2_ARCH = {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "n_kv_head": 4}


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def ours(tokenizer, arch: str, scaling=None, **kw) -> GPT:
    """A tiny model with weights away from their init (so that every mapping error shows in the logits)."""
    torch.manual_seed(0)
    extra = {**GPT2_ARCH, "max_seq_len": 4 * CTX} if arch == "gpt2" else {"n_kv_head": 2, "max_seq_len": CTX}
    model = GPT(
        GPTConfig(vocab_size=len(tokenizer), n_layer=2, n_head=4, d_model=32, rope_scaling=scaling, **{**extra, **kw})
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


CASES = [("llama", name) for name in SCALINGS] + [("gpt2", "none")]


@pytest.mark.parametrize("arch,method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_export_computes_what_we_compute(tokenizer, tmp_path, arch, method):
    model = ours(tokenizer, arch, SCALINGS[method])
    written = save_hf(model, tokenizer, tmp_path / "hf")
    assert written["architecture"] == ("GPT2LMHeadModel" if arch == "gpt2" else "LlamaForCausalLM")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(written["files"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no trust_remote_code
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    V = len(tokenizer)
    for length in (CTX, 4 * CTX):  # learned positions: the whole table
        x = torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, model(x)[..., :V], rtol=0, atol=1e-4)
    text = "reverse: open file read\nsort: b a c"
    assert hf_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    chat = [
        {"role": "user", "content": "sort: b a"},
        {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "reverse: x y"},
    ]
    theirs = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert theirs == tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = torch.tensor([tokenizer(text)["input_ids"]])
    new = 4 * CTX - prompt.size(1)  # up to 4x the training context (GPT-2: the end of its position table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # past the training context on purpose
        mine = model.generate(prompt, new, temperature=0)
        hf_out = hf.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert hf_out.tolist() == mine.tolist()


def test_export_config_and_files(tokenizer, tmp_path):
    """Both transformers generations' RoPE fields; YaRN's max_position_embeddings / original = factor; the
    generation config stops at EOS and at the chat template's <|end|>; the tied head is not stored twice; dtype."""
    save_hf(ours(tokenizer, "llama", SCALINGS["yarn"]), tokenizer, tmp_path / "hf", dtype="bfloat16")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == config["rope_scaling"]["type"] == "yarn"
    assert (
        config["max_position_embeddings"] == 4 * CTX
        and config["rope_scaling"]["original_max_position_embeddings"] == CTX
    )
    assert config["tie_word_embeddings"] and config["dtype"] == "bfloat16"
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].shape[0] == len(tokenizer)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    assert is_hf_model_dir(tmp_path / "hf") and not is_hf_model_dir(tmp_path)
    ntk = ours(tokenizer, "llama", SCALINGS["ntk"])
    save_hf(ntk, tokenizer, tmp_path / "ntk")
    config = json.loads((tmp_path / "ntk" / "config.json").read_text())
    assert config["rope_scaling"] is None and config["rope_theta"] == pytest.approx(10000 * 4 ** (8 / 6))


def hf_dir(tokenizer, tmp_path, kind: str, **kw):
    """An HF model built from a config (random weights), saved with save_pretrained beside our tokenizer."""
    torch.manual_seed(1)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer) + 3,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            **kw,
        )
    else:
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, **kw
        )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / kind)
    tokenizer.save_pretrained(tmp_path / kind)
    return model, tmp_path / kind


@pytest.mark.parametrize(
    "kw,field",
    [
        (
            {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 4,
                    "long_factor": [1.0] * 4,
                    "original_max_position_embeddings": 16,
                }
            },
            "rope_parameters.rope_type='longrope' is not supported",
        ),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "mlp_bias=False"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary",
        ),
    ],
)
def test_import_refuses_what_we_cannot_represent(tokenizer, tmp_path, kw, field):
    _, path = hf_dir(tokenizer, tmp_path, "llama", **kw)
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        ModelSource.resolve(path).load()


def test_import_errors_name_the_culprit(tokenizer, tmp_path):
    _, path = hf_dir(tokenizer, tmp_path, "gpt2")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps({**config, "model_type": "qwen2_moe"})
    )  # MoE with a gated shared expert
    with pytest.raises(ConfigError, match="model_type='qwen2_moe' is not supported"):
        ModelSource.resolve(path).load()
    (path / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))  # GPT-2's fields only
    with pytest.raises(ConfigError, match="config.json: hidden_size is missing"):
        ModelSource.resolve(path).load()
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": len(tokenizer) - 10}))
    with pytest.raises(DataError, match=f"the tokenizer has {len(tokenizer)} tokens"):
        ModelSource.resolve(path).load()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="no tokenizer files"):
        ModelSource.resolve(path).load()


def test_export_refuses_what_hf_cannot_represent(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="model.pos_emb=rope, model.norm=layernorm, model.mlp=swiglu"):
        save_hf(ours(tokenizer, "llama", norm="layernorm"), tokenizer, tmp_path / "a")
    with pytest.raises(ConfigError, match="model.n_kv_head=2"):
        save_hf(ours(tokenizer, "gpt2", n_kv_head=2), tokenizer, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not an empty directory"):
        save_hf(ours(tokenizer, "llama"), tokenizer, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["keep.txt"]


def test_learned_positions_generate_past_the_table(tokenizer):
    """Generation crops the context to the last max_seq_len tokens, with the KV cache as without it."""
    model = ours(tokenizer, "gpt2", max_seq_len=CTX)
    prompt = torch.randint(0, len(tokenizer), (2, 10))
    cached = model.generate(prompt, 3 * CTX, temperature=0)
    assert cached.shape == (2, 10 + 3 * CTX)
    assert torch.equal(cached, model.generate(prompt, 3 * CTX, temperature=0, use_cache=False))
    with torch.no_grad():  # the last token: greedy over the last CTX tokens before it
        assert torch.equal(model(cached[:, -CTX - 1 : -1])[:, -1, : len(tokenizer)].argmax(-1), cached[:, -1])


@pytest.mark.parametrize(
    "index", [{"metadata": {}}, {"weight_map": ["model.safetensors"]}, [1], {"weight_map": {"a": 1}}]
)
def test_a_shard_index_without_a_weight_map_is_one_line_naming_it(tokenizer, tmp_path, index):
    _, path = hf_dir(tokenizer, tmp_path, "llama")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DataError) as e:
        ModelSource.resolve(path).load()
    assert str(e.value) == (
        f"{path / 'model.safetensors.index.json'}: no weight_map in it (a JSON object of tensor name -> shard "
        "file, as transformers writes): not a shard index"
    )
