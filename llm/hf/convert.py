"""Our GPT <-> Hugging Face transformers, as plain dicts: the config.json of each family we know and the tensor
names of its safetensors, both ways. No transformers import: the files are the interface.

What differs per family (which options it carries, its config fields, its tensor names) lives in `families/`, one
row or module each; here is what they share: choosing the family of a model, the common config.json fields, and
moving tensors (q/k/v split from our fused projection, GPT-2's transposed Conv1D weights, the embedding cut to
the real vocabulary, ours being padded). A config.json field or a model option the family lacks is a one-line
ConfigError naming it.
"""

from __future__ import annotations

import torch

from llm.errors import ConfigError
from llm.hf.families import FAMILIES, Family
from llm.hf.families.moe import EXPERT
from llm.model import GPT, GPTConfig

ARCHITECTURES = {name: f.architecture for name, f in FAMILIES.items()}


def family_of(cfg: GPTConfig) -> Family:
    """The family that represents this model: the one it was imported from, else the first that fits (Llama
    before GPT-2 before the others); none fitting is a ConfigError naming the model key."""
    if cfg.family is not None:
        if cfg.family not in FAMILIES:
            raise ConfigError(f"model.family={cfg.family!r} is not one we write; known: {sorted(FAMILIES)}")
        why = FAMILIES[cfg.family].refusal(cfg)
        if why:
            raise ConfigError(f"{why} (the model came from {cfg.family}; set model.family=null to pick another)")
        return FAMILIES[cfg.family]
    reasons = {}
    for fam in FAMILIES.values():
        why = fam.refusal(cfg)
        if why is None:
            return fam
        if (cfg.moe is not None) == ("moe" in fam.frees):  # a MoE model: the MoE families' reasons are the close ones
            reasons[fam.architecture] = why
    arch = {key: getattr(cfg, key) for key in ("pos_emb", "norm", "mlp")}
    close = [r for a, r in reasons.items() if all(f"model.{k}=" not in r for k in arch)]
    if close:  # a family with our block but not this option: its reason names the option
        raise ConfigError(f"no Hugging Face architecture represents this model: {close[0]}")
    shown = ", ".join(f"model.{k}={v}" for k, v in arch.items())
    raise ConfigError(
        f"{shown}: no Hugging Face architecture represents this combination "
        f"(LlamaForCausalLM: rope/rmsnorm/swiglu, GPT2LMHeadModel: learned/layernorm/gelu, "
        f"Gemma3ForCausalLM: rope/rmsnorm/geglu)"
    )


def family(cfg: GPTConfig) -> str:
    """The model_type this model is written as (see `family_of`)."""
    return family_of(cfg).model_type


# ---------------------------------------------------------------------------------------------- config.json
def config_to_hf(cfg: GPTConfig, dtype: str, special: dict) -> dict:
    """config.json for our model: `special` holds bos/eos/pad token ids."""
    fam = family_of(cfg)
    return {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the 4.x name
        **special,
        **fam.config_to_hf(cfg),
    }


def config_from_hf(hf: dict) -> dict:
    """Our GPTConfig keyword arguments (rope_scaling included) from an HF config.json of a family we know."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ConfigError(f"config.json: model_type={kind!r} is not supported; supported: {sorted(FAMILIES)}")
    fam = FAMILIES[kind]
    try:
        options = fam.config_from_hf(hf)
    except KeyError as e:
        raise ConfigError(f"config.json: {e.args[0]} is missing (a {kind} config needs it)") from None
    return {
        "vocab_size": hf.get("vocab_size"),
        "pad_vocab_to": 1,  # HF's rows exactly
        "tie_embeddings": bool(hf.get("tie_word_embeddings", kind in ("gpt2", "gemma3_text"))),
        "init_std": hf.get("initializer_range", 0.02),
        "dropout": 0.0,
        **options,
        "family": kind,
    }


# ---------------------------------------------------------------------------------------------- tensors
def name_map(cfg: GPTConfig) -> dict[str, str]:
    """Every parameter name of ours -> its HF name (the fused qkv maps to GPT-2's c_attn; for the others to a
    `qkv` prefix that `to_hf` splits into q_proj / k_proj / v_proj)."""
    fam = family_of(cfg)
    pairs = list(fam.top_names().items())
    for i in range(cfg.n_layer):
        pairs += [(f"blocks.{i}.{ours}", theirs) for ours, theirs in fam.layer_names(i).items()]
    names = {f"{ours}.{kind}": f"{theirs}.{kind}" for ours, theirs in pairs for kind in ("weight", "bias")}
    # stacked experts [E, out, in] (a parameter without a .weight suffix) <-> one tensor per expert
    names.update({ours: f"{theirs}.weight" for ours, theirs in pairs if EXPERT in theirs})
    return names


def _conv1d(fam: Family, ours: str) -> bool:  # GPT-2's Conv1D stores linear weights as [in, out]
    return fam.conv1d and ours.startswith("blocks.") and ours.endswith(".weight") and ".norm" not in ours


def to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names (embedding and untied head cut to the vocabulary; tied head left out)."""
    cfg, fam, names = model.config, family_of(model.config), name_map(model.config)
    split = not fam.fused_qkv
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {}
    for ours, tensor in model.state_dict().items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor = tensor.detach()
        if ours.startswith(("tok_emb.", "lm_head.")):
            tensor = tensor[: cfg.vocab_size]
        theirs = names[ours]
        if _conv1d(fam, ours):
            tensor = tensor.t()
        if EXPERT in theirs:  # one tensor per expert
            out.update({theirs.format(e=e): piece.contiguous().clone() for e, piece in enumerate(tensor)})
            continue
        if split and ".self_attn.qkv." in theirs:
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv], dim=0)):
                out[theirs.replace("qkv", part)] = piece.contiguous().clone()
            continue
        out[theirs] = tensor.contiguous().clone()
    return out


def from_hf(model: GPT, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy HF tensors into our model in place (the padded embedding rows keep their values); a missing or unused
    tensor is a ConfigError naming it and `where`."""
    cfg, fam = model.config, family_of(model.config)
    base = "transformer." if fam.model_type == "gpt2" else "model."
    tensors = {
        (k if k.startswith((base, "lm_head.")) else base + k): v
        for k, v in tensors.items()
        if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
    }  # old buffers
    if not fam.fused_qkv:  # fuse q/k/v into our qkv
        for i in range(cfg.n_layer):
            h = f"model.layers.{i}.self_attn."
            for suffix in ("weight", "bias"):
                parts = [tensors.pop(f"{h}{p}_proj.{suffix}", None) for p in ("q", "k", "v")]
                if all(p is not None for p in parts):
                    tensors[f"{h}qkv.{suffix}"] = torch.cat(parts, dim=0)
                elif any(p is not None for p in parts):
                    raise ConfigError(f"{where}: layer {i} has biases on only some of q/k/v_proj; not supported")
    names = name_map(cfg)
    params = model.state_dict()
    with torch.no_grad():
        for ours, target in params.items():
            if ours == "lm_head.weight" and cfg.tie_embeddings:
                continue
            theirs = names[ours]
            if EXPERT in theirs:  # the experts' tensors stacked
                theirs = [theirs.format(e=e) for e in range(target.size(0))]
                missing = [t for t in theirs if t not in tensors]
                if missing:
                    raise ConfigError(f"{where}: tensor {missing[0]!r} is missing")
                tensor = torch.stack([tensors.pop(t) for t in theirs])
            elif theirs not in tensors:
                raise ConfigError(f"{where}: tensor {theirs!r} is missing")
            else:
                tensor = tensors.pop(theirs)
            if _conv1d(fam, ours):
                tensor = tensor.t()
            rows = tensor.size(0) if ours.startswith(("tok_emb.", "lm_head.")) else target.size(0)
            if tuple(tensor.shape) != (rows, *target.shape[1:]) or rows > target.size(0):
                raise ConfigError(
                    f"{where}: tensor {theirs!r} has shape {tuple(tensor.shape)}, the config says {tuple(target.shape)}"
                )
            target[:rows].copy_(tensor)
    tensors.pop("lm_head.weight", None)  # a tied head saved anyway
    if tensors:
        raise ConfigError(
            f"{where}: tensor(s) {sorted(tensors)[:3]} have no place in {fam.architecture} "
            f"as we read it (biases where the config has none?)"
        )
