"""Hugging Face model directories on disk: write one from our model and tokenizer (`save_hf`), read one's parts
(`read_hf_config`, `load_hf_tokenizer`, `load_hf_weights`: llm.tasks.source.ModelSource puts them together).

A written directory holds `config.json`, `model.safetensors` (HF names, the checkpoint's dtype or the one asked
for), the tokenizer files with its special tokens and chat template, and `generation_config.json`; it loads with
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`, no remote code. It is
written into `<dir>.tmp` and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llm.data.chat import reserved_chat_template, stop_token_id
from llm.data.hub import hub_call
from llm.data.tokenizer import load_pretrained
from llm.errors import ConfigError, DataError, check_choice
from llm.failures import about
from llm.hf.convert import config_from_hf, config_to_hf, family_of, from_hf, to_hf
from llm.model import GPT
from llm.utils.files import atomic_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def fetch_hub_model(name: str, key: str = "init_from") -> Path:
    """A hub model name (`HuggingFaceTB/SmolLM2-135M`) -> its local snapshot: config, safetensors and tokenizer
    files only (network needed once; HF_HUB_OFFLINE=1 uses the local cache)."""
    from huggingface_hub import snapshot_download

    def load():
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))

    try:
        return hub_call(key, name, load, ConfigError)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"{key}={name!r}: no such local dir, and not loadable from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def looks_like_hub_name(value: str) -> bool:
    """`owner/name` that is not a local path: what init_from fetches from the Hugging Face hub."""
    text = str(value)
    return (
        text.count("/") == 1
        and not text.startswith((".", "/", "~", "latest:"))
        and not Path(text).exists()
        and all(part.strip() for part in text.split("/"))
    )


def is_hf_model_dir(path: str | Path) -> bool:
    """A directory with an HF config.json that is not one of our checkpoints or run dirs."""
    path = Path(path)
    return (
        (path / "config.json").is_file()
        and not (path / "manifest.json").exists()
        and not (path / "checkpoints").is_dir()
    )


def save_hf(model: GPT, tokenizer, out_dir: str | Path, dtype: str | None = None, key: str = "task.out_dir") -> dict:
    """Write `model` and `tokenizer` as an HF model directory; returns what was written (for results.json)."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{key}={str(out)!r} exists and is not an empty directory (nothing is overwritten)")
    fam = family_of(model.config)  # a model HF cannot represent fails before anything is written
    dtype = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
    check_choice("task.dtype", dtype, DTYPES)
    if len(tokenizer) > model.config.vocab_size:
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens, the model only {model.config.vocab_size} rows")
    reserved_chat_template(tokenizer)  # a pretraining run's BPE reserves the built-in chat tokens
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    eos = [tokenizer.eos_token_id]
    if getattr(tokenizer, "chat_template", None) and stop_token_id(tokenizer) not in eos:
        eos.append(stop_token_id(tokenizer))  # a chat reply ends at <|end|> (or its template's end of turn)
    with atomic_dir(out) as tmp:  # an existing `out` is empty (checked above)
        tensors = {k: v.to(DTYPES[dtype]) for k, v in to_hf(model).items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = config_to_hf(model.config, dtype, special)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {**special, "eos_token_id": eos if len(eos) > 1 else eos[0]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
    return {
        "out_dir": str(out),
        "architecture": fam.architecture,
        "dtype": dtype,
        "params": sum(t.numel() for t in tensors.values()),
        "files": sorted(p.name for p in out.iterdir()),
    }


def read_hf_config(path: str | Path, key: str = "init_from") -> dict:
    """Our GPTConfig keyword arguments from an HF model dir's config.json (errors name `key` and the dir)."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={str(path)!r}: cannot read config.json ({e})") from e
    try:
        return config_from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{key}={str(path)!r}: {e}") from None


def load_hf_weights(path: str | Path, model: GPT, key: str = "init_from") -> None:
    """Fill `model` with the weights of an HF model dir (one safetensors file or an index of shards)."""
    path = Path(path)
    if (path / INDEX).is_file():
        with about(path / INDEX):
            index = json.loads((path / INDEX).read_text())
        shards = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(shards, dict) or not all(isinstance(f, str) for f in shards.values()):
            raise DataError(
                f"{path / INDEX}: no weight_map in it (a JSON object of tensor name -> shard file, as transformers "
                "writes): not a shard index"
            )
        files = sorted(set(shards.values()))
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        found = sorted(p.name for p in path.glob("*.bin"))
        raise ConfigError(
            f"{key}={str(path)!r}: no {WEIGHTS} in it"
            + (f" (only {found}: pickled weights are not loaded; convert them to safetensors)" if found else "")
        )
    tensors = {}
    for name in files:
        with about(path / name), safe_open(str(path / name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    dtype = next(model.parameters()).dtype
    from_hf(model, {k: v.to(dtype) for k, v in tensors.items()}, f"{key}={str(path)!r}")


def load_hf_tokenizer(path: str | Path, vocab_size: int, key: str = "init_from"):
    """The tokenizer of an HF model dir; one that has more tokens than the model has rows is a DataError."""
    path = Path(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise DataError(f"{key}={str(path)!r}: no tokenizer files in it (tokenizer.json / tokenizer_config.json)")
    try:
        tokenizer = load_pretrained(str(path))
    except DataError as e:
        raise DataError(f"{key}={str(path)!r}: its tokenizer does not load ({str(e).split(': ', 1)[-1]})") from None
    if len(tokenizer) > vocab_size:
        raise DataError(
            f"{key}={str(path)!r}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
            f"(config.json vocab_size) only {vocab_size}"
        )
    return tokenizer
