"""A trained model out of the runner, and in from anywhere outside a training run (export, generate, lm_eval, a
LoRA run's base): `load_source` reads a Hugging Face model dir, one of our checkpoints, or a LoRA checkpoint (its
base loaded from that base's own source, the adapters applied and by default merged into the weights);
`export_model` writes a Hugging Face model dir, or a LoRA run's adapters as a PEFT adapter dir."""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from llm.checkpoint.adapters import is_adapter_checkpoint, load_adapted
from llm.checkpoint.files import load_checkpoint_model, load_model_weights, resolve_checkpoint
from llm.errors import ConfigError
from llm.hf import is_hf_model_dir, load_hf, load_hf_weights, save_hf, save_peft_dir
from llm.peft import merge_lora


def load_source(path: str | Path, rope_scaling: dict | None = None, merge: bool = True, key: str = "init_from"):
    """(model in eval mode, tokenizer) of an HF model dir, a checkpoint dir or a run dir (its newest complete
    checkpoint). A LoRA checkpoint comes with its adapters merged (`merge=False`: still as adapters)."""
    path = Path(path).expanduser()
    if is_hf_model_dir(path):
        return load_hf(path, rope_scaling, key=key)
    path = resolve_checkpoint(path, key)
    if not is_adapter_checkpoint(path):
        return load_checkpoint_model(path, rope_scaling)
    model, tokenizer = load_adapted(
        path, lambda base, scaling: load_source(base, scaling, key=f"{path}: base"), rope_scaling
    )
    return (merge_lora(model) if merge else model).eval(), tokenizer


def load_weights(path: Path, model) -> None:
    """Fill a built model with the weights at `path` (an HF dir, a checkpoint, a LoRA checkpoint: its base with
    the adapters merged), for `init_from`."""
    if is_hf_model_dir(path):
        load_hf_weights(path, model)
    elif is_adapter_checkpoint(path):
        model.load_state_dict(load_source(path)[0].state_dict())
    else:
        load_model_weights(path, model)


def export_model(init: str | Path, rope_scaling: dict | None, out_dir: Path, dtype: str | None, merge_lora_=True):
    """Write the model at `init` to `out_dir` as an HF model dir (a LoRA checkpoint: its adapters merged), or with
    `merge_lora_=False` a LoRA checkpoint's adapters as a PEFT adapter dir. Returns what was written."""
    if not isinstance(merge_lora_, bool):
        raise ConfigError(f"task.merge_lora={merge_lora_!r} must be true or false")
    init = Path(init)
    lora = not is_hf_model_dir(init) and is_adapter_checkpoint(resolve_checkpoint(init, "init_from"))
    if lora and not merge_lora_:
        written = export_adapters(init, rope_scaling, out_dir, dtype)
        logger.info(
            f"exported LoRA adapters ({written['params']:,} parameters) to {written['out_dir']}: load them with "
            f"peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({written['base_model']!r}), dir)"
        )
        return written
    model, tokenizer = load_source(init, rope_scaling)  # a LoRA checkpoint's adapters merged into the weights
    written = {**save_hf(model, tokenizer, out_dir, dtype), "merged_lora": lora}
    logger.info(
        f"exported {written['architecture']} ({written['params']:,} parameters, {written['dtype']}) to "
        f"{written['out_dir']}: load it with transformers.AutoModelForCausalLM.from_pretrained(dir)"
    )
    return written


def export_adapters(init: Path, rope_scaling: dict | None, out_dir: Path, dtype: str | None) -> dict:
    """A LoRA checkpoint's adapters as a PEFT adapter dir for the HF model their base is (an HF dir: as it is),
    else for their base exported into `<out_dir>/base/`."""
    model, tokenizer = load_source(init, rope_scaling, merge=False)
    base = model.peft_config["base"]
    if is_hf_model_dir(base["init_from"]) and not base.get("grown_vocab"):
        return save_peft_dir(model, out_dir, base["init_from"], dtype)
    written = save_peft_dir(model, out_dir, Path(out_dir).expanduser().absolute() / "base", dtype)
    save_hf(merge_lora(model, add=False), tokenizer, Path(written["base_model"]), dtype)  # the base alone
    return {**written, "files": sorted(p.name for p in Path(written["out_dir"]).iterdir())}
