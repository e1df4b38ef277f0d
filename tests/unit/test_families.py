"""The open families in and out, in-process on tiny random models that transformers builds and saves: Llama 3.x
(llama3 RoPE), Mistral (a sliding window in every layer, a head width other than D/H), Qwen 2.5 (q/k/v biases,
sliding layers), Qwen 3 (QK-norm, YaRN, sliding layers), Gemma 3 (every Gemma option, local and global RoPE,
soft-capping) and GPT-2. Each: logits equal to transformers' at 1x and 4x its context with windows shorter than
the text, greedy generation equal to transformers' past the window, an export of the import holding the very same
tensors under the family's own class (tests/integration/test_families_use.py loads the exports after 3 SFT steps
through run.py in transformers, and compares the logits)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from llm.data.chat import encode_chat, stop_token_id
from llm.errors import ConfigError
from llm.hf import save_hf
from llm.model import GPT, GPTConfig
from llm.tasks.source import ModelSource

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

CTX, WINDOW = 32, 8  # the models' context (tested at 1x and 4x) and their sliding window, shorter than both
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def hf_config(kind: str, vocab: int):
    """A tiny config of each family, with the options that set it apart switched on."""
    common = dict(vocab_size=vocab, max_position_embeddings=CTX, tie_word_embeddings=False, **DIMS)
    if kind == "llama":  # Llama 3.2: llama3 RoPE scaling, tied head
        rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 4.0, "low_freq_factor": 1.0}
        rope.update(high_freq_factor=4.0, original_max_position_embeddings=CTX // 4)
        return transformers.LlamaConfig(**{**common, "tie_word_embeddings": True}, rope_parameters=rope)
    if kind == "mistral":
        return transformers.MistralConfig(**common, head_dim=8, sliding_window=WINDOW)
    if kind == "qwen2":  # Qwen 2.5: q/k/v biases; the second layer slides
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if kind == "qwen3":
        rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": CTX}
        return transformers.Qwen3Config(
            **common,
            head_dim=32,
            rope_parameters=rope,
            use_sliding_window=True,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
        )
    if kind == "gemma3_text":
        rope = {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
        return transformers.Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True},
            head_dim=32,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            rope_parameters=rope,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        )
    return transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=4 * CTX)


KINDS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2"]
CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def hf_model_dir(kind: str, tokenizer, path):
    """A random model of the family, every weight moved off its init (norms included, so that no two tensors
    are interchangeable), saved with our tokenizer; returned with the model (eager attention: the reference)."""
    torch.manual_seed(0)
    config = hf_config(kind, len(tokenizer) + 3)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, path


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out)[..., : model.config.vocab_size]


@pytest.mark.parametrize("kind", KINDS)
def test_family_in_and_out(tiny_tokenizer, tmp_path, kind):
    theirs, path = hf_model_dir(kind, tiny_tokenizer, tmp_path / "hf")
    model, tok = ModelSource.resolve(path).load()
    assert model.config.family == kind and len(tok) <= model.config.vocab_size
    if kind in ("mistral", "qwen2", "qwen3", "gemma3_text"):
        assert model.config.sliding_window == WINDOW < CTX
    V = theirs.config.vocab_size
    for length in (CTX, 4 * CTX):
        x = torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(length))
        torch.testing.assert_close(logits(model, x), logits(theirs, x), rtol=0, atol=1e-4)
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = model.generate(prompt, WINDOW + 4, temperature=0)  # past the window: the band mask on the cache
        hf_out = theirs.generate(prompt, max_new_tokens=WINDOW + 4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert mine.tolist() == hf_out.tolist()

    written = save_hf(model, tok, tmp_path / "back")  # a round trip with no training: the very same tensors
    assert written["architecture"] == CLASSES[kind]
    before, after = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    before = {k: v for k, v in before.items() if not k.endswith(".attn.bias")}  # GPT-2's old mask buffers
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((tmp_path / "back" / "config.json").read_text())  # transformers loads it after SFT:
    assert config["architectures"] == [CLASSES[kind]] and config["model_type"] == kind  # test_families_use.py


def test_families_refuse_what_they_lack(tiny_tokenizer, tmp_path):
    """One line naming the field: an MoE family, a rope type we lack, Gemma's bidirectional attention; and on the
    way out, an option the model's own family does not have."""
    _, path = hf_model_dir("qwen3", tiny_tokenizer, tmp_path / "q")
    config = json.loads((path / "config.json").read_text())
    for change, match in [
        ({"model_type": "qwen2_moe"}, "model_type='qwen2_moe' is not supported"),  # shared expert gate
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported for qwen3"),
        ({"attention_bias": True}, "attention_bias=True is not supported for qwen3"),
    ]:
        (path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=match):
            ModelSource.resolve(path).load()
    (path / "config.json").write_text(json.dumps(config))
    model, tok = ModelSource.resolve(path).load()
    model.config.qkv_bias = True
    with pytest.raises(ConfigError, match="model.qkv_bias=true: Qwen3ForCausalLM needs model.qkv_bias=false"):
        save_hf(model, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options,arch",
    [
        ({}, "LlamaForCausalLM"),
        ({"qk_norm": True, "head_dim": 16}, "Qwen3ForCausalLM"),
        ({"qkv_bias": True, "sliding_window": 4, "sliding_layers": [1]}, "Qwen2ForCausalLM"),
        ({"sliding_window": 4}, "MistralForCausalLM"),
    ],
)
def test_models_from_scratch_go_out_as_the_family_that_has_their_options(tiny_tokenizer, tmp_path, options, arch):
    """model.qk_norm=true etc. from scratch: exported as the first family that represents it, same logits."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=len(tiny_tokenizer), n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16)
    model = GPT(GPTConfig(**{**cfg.to_dict(), "head_dim": None, **options})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert save_hf(model, tiny_tokenizer, tmp_path / "hf")["architecture"] == arch
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = torch.randint(0, len(tiny_tokenizer), (2, 16))
    torch.testing.assert_close(logits(hf, x), logits(model, x)[..., : len(tiny_tokenizer)], rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="model.qkv_bias=true"):
        save_hf(GPT(GPTConfig(**{**cfg.to_dict(), "qk_norm": True, "qkv_bias": True})), tiny_tokenizer, tmp_path / "x")


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_gemma_chat_turns_end_at_end_of_turn(tiny_tokenizer):
    """A Gemma-format template (BOS from the template, turns closed by <end_of_turn>): one BOS, the loss on the
    reply and its <end_of_turn>, and generation stops there rather than at EOS."""
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    tokenizer.add_special_tokens(
        {"bos_token": "<bos>", "eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    )
    tokenizer.chat_template = GEMMA_TEMPLATE
    ids, mask = encode_chat(
        tokenizer, [{"role": "user", "content": "sort: b a"}, {"role": "assistant", "content": "a b"}]
    )
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    reply = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(reply).startswith("a b<end_of_turn>") and end in reply
    assert stop_token_id(tokenizer) == end


def test_sliding_window_with_packed_rows_and_left_padding():
    """The window's band narrows the other masks, never widens them: two sequences packed in one row (block-diagonal
    mask, positions restarting) compute what each computes alone, and a left-padded batch generates what each
    prompt generates alone."""
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32, sliding_window=3)
    ).eval()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 5))
    packed = torch.cat([a, b], dim=1)
    same = torch.zeros(12, 12, dtype=torch.bool)
    same[:7, :7], same[7:, 7:] = True, True
    mask = (same & torch.ones(12, 12, dtype=torch.bool).tril())[None, None]
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=positions, attn_mask=mask)
        torch.testing.assert_close(out[:, :7], model(a), rtol=0, atol=1e-5)
        torch.testing.assert_close(out[:, 7:], model(b), rtol=0, atol=1e-5)
    batch = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), b], dim=1), a], dim=0)  # b padded left by 2
    keep = torch.ones(2, 7, dtype=torch.long)
    keep[0, :2] = 0
    together = model.generate(batch, 6, temperature=0, attention_mask=keep)
    assert together[0, 2:].tolist() == model.generate(b, 6, temperature=0)[0].tolist()
    assert together[1].tolist() == model.generate(a, 6, temperature=0)[0].tolist()
    assert torch.equal(model.generate(a, 6, temperature=0), model.generate(a, 6, temperature=0, use_cache=False))
