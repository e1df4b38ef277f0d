"""task=export: a trained model written as a Hugging Face model dir, or a LoRA run's adapters as a PEFT adapter
dir."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from llm.errors import ConfigError
from llm.hf import is_hf_model_dir, save_hf, save_peft_dir
from llm.peft import merge_lora
from llm.tasks.config import JobInfo
from llm.tasks.source import ModelSource, open_source
from llm.utils.files import write_atomic


def run(cfg: DictConfig, job: JobInfo) -> dict:
    """task=export (its entry): the init_from model (its RoPE scaling, or extrapolation=... when set) as a Hugging
    Face model dir (a LoRA run's: merged, or with task.merge_lora=false a PEFT adapter dir), by default `hf/` in
    this run's dir; results.json says what was written."""
    source = open_source(cfg, job.explicit)
    job.stop.check("after resolving init_from")
    run_dir = job.run_dir
    out_dir = Path(str(cfg.task.out_dir)).expanduser() if cfg.task.get("out_dir") else run_dir / "hf"
    written = export_model(
        source,
        OmegaConf.to_container(cfg.extrapolation, resolve=True),
        out_dir,
        cfg.task.get("dtype"),
        cfg.task.get("merge_lora", True),
    )
    results = {"task": "export", "init_from": str(source.path), **written}
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    return results


def export_model(source: ModelSource, rope_scaling: dict | None, out_dir: Path, dtype: str | None, merge_lora_=True):
    """Write the model of `source` to `out_dir` as an HF model dir (a LoRA checkpoint: its adapters merged), or
    with `merge_lora_=False` a LoRA checkpoint's adapters as a PEFT adapter dir. Returns what was written."""
    if not isinstance(merge_lora_, bool):
        raise ConfigError(f"task.merge_lora={merge_lora_!r} must be true or false")
    if source.lora and not merge_lora_:
        written = export_adapters(source, rope_scaling, out_dir, dtype)
        logger.info(
            f"exported LoRA adapters ({written['params']:,} parameters) to {written['out_dir']}: load them with "
            f"peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({written['base_model']!r}), dir)"
        )
        return written
    model, tokenizer = source.load(rope_scaling)  # a LoRA checkpoint's adapters merged into the weights
    written = {**save_hf(model, tokenizer, out_dir, dtype), "merged_lora": source.lora}
    logger.info(
        f"exported {written['architecture']} ({written['params']:,} parameters, {written['dtype']}) to "
        f"{written['out_dir']}: load it with transformers.AutoModelForCausalLM.from_pretrained(dir)"
    )
    return written


def export_adapters(source: ModelSource, rope_scaling: dict | None, out_dir: Path, dtype: str | None) -> dict:
    """A LoRA checkpoint's adapters as a PEFT adapter dir for the HF model their base is (an HF dir: as it is),
    else for their base exported into `<out_dir>/base/`."""
    model, tokenizer = source.load(rope_scaling, merge=False)
    base = model.peft_config["base"]
    if is_hf_model_dir(base["init_from"]) and not base.get("grown_vocab"):
        return save_peft_dir(model, out_dir, base["init_from"], dtype)
    written = save_peft_dir(model, out_dir, Path(out_dir).expanduser().absolute() / "base", dtype)
    save_hf(merge_lora(model, add=False), tokenizer, Path(written["base_model"]), dtype)  # the base alone
    return {**written, "files": sorted(p.name for p in Path(written["out_dir"]).iterdir())}
