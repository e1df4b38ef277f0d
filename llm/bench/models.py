"""The two sides of the throughput benchmark: our GPTConfig from a model preset, with the architecture fields set
to match its Hugging Face counterpart (Llama or GPT-2), and that counterpart built with the same dimensions."""

from __future__ import annotations

from pathlib import Path

import yaml

PRESETS = Path(__file__).resolve().parents[2] / "conf" / "model"
# neither counterpart has QK-norm (on in the presets): both sides are measured without it
GPT2_FIELDS = {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "qk_norm": False}
LLAMA_FIELDS = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": False}


def load_preset(name: str) -> dict:
    """A preset name (`tiny`, `125m`, `1b`) or a path to a model yaml -> GPTConfig kwargs."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(
            f"no model preset {name!r} (looked for {path}); presets: {sorted(p.stem for p in PRESETS.glob('*.yaml'))}"
        )
    cfg = yaml.safe_load(path.read_text()) or {}
    cfg.pop("_target_", None)
    return cfg


def model_kwargs(args) -> tuple[dict, str]:
    """Our GPTConfig kwargs with the architecture fields set to match the HF counterpart, and that arch."""
    cfg = load_preset(args.model)
    arch = args.arch
    if arch == "auto":
        gpt2_like = cfg.get("pos_emb") == "learned" or cfg.get("norm") == "layernorm" or cfg.get("mlp") == "gelu"
        arch = "gpt2" if gpt2_like else "llama"
    cfg.update(GPT2_FIELDS if arch == "gpt2" else LLAMA_FIELDS)
    if arch == "gpt2":
        cfg["n_kv_head"] = cfg["n_head"]  # GPT-2 has no grouped-query attention
    cfg.update(dropout=0.0, rope_scaling=None)  # neither side drops out; HF has no length-scaling counterpart
    if args.vocab_size is not None:
        cfg["vocab_size"] = args.vocab_size
    elif "vocab_size" not in cfg:
        cfg["vocab_size"] = 4096 if Path(args.model).stem == "tiny" else 50304
    return cfg, arch


def build_hf(arch: str, c):
    """The transformers model with the dimensions of our resolved GPTConfig `c` (tied head, SDPA, no cache)."""
    import transformers

    transformers.logging.set_verbosity_error()
    if arch == "llama":
        hf_cfg = transformers.LlamaConfig(
            vocab_size=c.padded_vocab_size,
            hidden_size=c.d_model,
            intermediate_size=c.ffn_hidden,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_kv_head,
            max_position_embeddings=c.max_seq_len,
            rms_norm_eps=c.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
        )
    else:
        hf_cfg = transformers.GPT2Config(
            vocab_size=c.padded_vocab_size,
            n_embd=c.d_model,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_positions=c.max_seq_len,
            n_inner=c.ffn_hidden,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=c.norm_eps,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
        )
    return transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
