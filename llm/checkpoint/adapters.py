"""Checkpoints of a LoRA run (llm.peft): `model.safetensors` holds only the adapters (and, when the run grew the
vocabulary, the grown embedding, which is part of its base and exists nowhere else), the optimizer files only
their state, and `adapter.json` the LoRA config and the base: the init_from it came from and a sha256 of its
weights. A resume whose base has another digest is refused in one line; an export or a later init_from loads the
base again, checks the digest and applies the adapters (`load_adapted`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from loguru import logger
from safetensors.torch import load_file

from llm.checkpoint.files import read_json
from llm.data.tokenizer import load_pretrained
from llm.errors import ConfigError, DataError
from llm.peft import LoRAConfig, adapter_state, apply_lora, base_sha256

ADAPTER_FILE = "adapter.json"
GROWN = ("tok_emb.weight", "lm_head.weight")  # base tensors a vocabulary growth changed (kept with the adapters)
RECORD_KEYS = ("rank", "alpha", "dropout", "target_modules", "base")  # what adapter.json holds


def is_adapter_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_FILE).is_file()


def read_adapter_record(directory: str | Path) -> dict:
    """A LoRA checkpoint's adapter.json; DataError naming the file when it is not JSON or not such a record."""
    info = read_json(directory, ADAPTER_FILE)
    missing = [k for k in RECORD_KEYS if k not in info]
    if missing or not isinstance(info["base"], dict):
        raise DataError(
            f"{Path(directory) / ADAPTER_FILE}: not the record of a LoRA run's adapters (no "
            f"{missing[0] if missing else 'base object'}): the checkpoint is damaged; use another one"
        )
    return info


def saved_tensors(model: torch.nn.Module, full: dict | None = None) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint's model.safetensors holds: the adapters (+ the grown embedding / untied head).
    `full`: the model's full state dict when already gathered (FSDP), else the model's own."""
    full = model.state_dict() if full is None else full
    keep = set(adapter_state(model))
    if model.peft_config["base"].get("grown_vocab"):
        keep |= {k for k in GROWN if k in full}
    out = {k: v for k, v in full.items() if k in keep}
    if "lm_head.weight" in out and model.config.tie_embeddings:
        del out["lm_head.weight"]  # stored once, as tok_emb.weight
    return out


def adapter_json(model: torch.nn.Module) -> str:
    return json.dumps(model.peft_config, indent=2)


def check_base(path: Path, model: torch.nn.Module, key: str) -> None:
    """The checkpoint at `path` and the run resuming it have LoRA on the same base with the same settings."""
    if not is_adapter_checkpoint(path):
        raise ConfigError(f"{key}={str(path)!r} holds full weights, not LoRA adapters: resume it without peft=lora")
    saved = read_adapter_record(path)
    now = model.peft_config
    if saved["base"].get("sha256") != now["base"].get("sha256"):
        raise ConfigError(
            f"{key}={str(path)!r}: its adapters were trained on other base weights (init_from="
            f"{saved['base'].get('init_from')}, sha256 {str(saved['base'].get('sha256'))[:12]}) than this run's "
            f"(init_from={now['base'].get('init_from')}, sha256 {str(now['base'].get('sha256'))[:12]}); resume "
            f"with the init_from it was trained on"
        )
    for k in ("rank", "alpha", "dropout", "modules"):
        if saved.get(k) != now.get(k):
            raise ConfigError(f"{key}={str(path)!r}: peft {k}={saved.get(k)!r} in the checkpoint vs {now.get(k)!r} now")


def load_saved(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against what this model's LoRA checkpoint holds (names and shapes)."""
    tensors = load_file(str(Path(path) / "model.safetensors"))
    expected = saved_tensors(model)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        wrong = sorted(k for k in expected if k in tensors and tensors[k].shape != expected[k].shape)
        raise ConfigError(
            f"checkpoint {path}: adapters do not match the model (missing {sorted(set(expected) - set(tensors))[:3]}"
            f", unexpected {sorted(set(tensors) - set(expected))[:3]}, other shape {wrong[:3]})"
        )
    return tensors


@torch.no_grad()
def load_adapters(path: Path, model: torch.nn.Module) -> None:
    """Copy a LoRA checkpoint's tensors into a plain (not sharded) model that has the same adapters."""
    params = model.state_dict()
    for name, tensor in load_saved(path, model).items():
        params[name].copy_(tensor)  # a tied head shares tok_emb.weight's storage


def attach_lora(model: torch.nn.Module, config: LoRAConfig, init_from, vocab_before: int | None) -> None:
    """Apply LoRA to a run's model, recording its base: the init_from it came from (None: random weights), a
    digest of its weights, and whether the run grew its vocabulary (vocab_before: the init_from's)."""
    grown = vocab_before is not None and model.config.vocab_size != vocab_before
    base = {"init_from": str(init_from) if init_from else None, "sha256": base_sha256(model), "grown_vocab": grown}
    apply_lora(model, config, base)
    logger.info(
        f"peft: LoRA rank {config.rank}, alpha {config.alpha:g} on {len(model.peft_config['modules'])} linear layers "
        f"({config.target_modules}); base sha256 {base['sha256'][:12]}"
    )


def load_adapted(directory: str | Path, load_base, rope_scaling: dict | None = None):
    """(model with its adapters, tokenizer) of a LoRA checkpoint: the base from `load_base(init_from,
    rope_scaling) -> (model, tokenizer)`, its vocabulary grown as in training, its digest checked, the adapters
    loaded. The tokenizer is the checkpoint's own."""
    directory = Path(directory)
    info = read_adapter_record(directory)
    base = info["base"]
    if not base.get("init_from"):
        raise ConfigError(
            f"{directory}: its LoRA adapters were trained on a randomly initialised base (no init_from), which "
            f"is not saved anywhere; train LoRA from a saved model (init_from=...)"
        )
    model, _ = load_base(base["init_from"], rope_scaling)
    saved_cfg = read_json(directory, "model_config.json")
    if saved_cfg["vocab_size"] > model.config.vocab_size:
        model.resize_vocab(saved_cfg["vocab_size"])
    config = LoRAConfig(
        rank=info["rank"], alpha=info["alpha"], dropout=info["dropout"], target_modules=info["target_modules"]
    )
    apply_lora(model, config, dict(base))
    load_adapters(directory, model)  # the grown embedding first: the digest covers it
    digest = base_sha256(model)
    if digest != base.get("sha256"):
        raise ConfigError(
            f"{directory}: the base its adapters were trained on changed (init_from={base['init_from']}: sha256 "
            f"{digest[:12]} now, {str(base.get('sha256'))[:12]} then); restore that model, or train the adapters again"
        )
    return model.eval(), load_pretrained(str(directory / "tokenizer"))
