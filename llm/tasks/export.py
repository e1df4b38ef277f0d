"""task=export: a trained model written as a Hugging Face model dir."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from llm.checkpoint.files import load_checkpoint_model
from llm.hf import is_hf_model_dir, load_hf, save_hf


def export(cfg: DictConfig, run_dir: Path) -> dict:
    """task=export: the init_from model (its RoPE scaling, or extrapolation=... when set) as a Hugging Face model
    dir, by default `hf/` in this run's dir; results.json says what was written."""
    init = Path(cfg.init_from)
    rope_scaling = OmegaConf.to_container(cfg.extrapolation, resolve=True)
    load = load_hf if is_hf_model_dir(init) else load_checkpoint_model
    model, tokenizer = load(init, rope_scaling)
    out_dir = Path(str(cfg.task.out_dir)).expanduser() if cfg.task.get("out_dir") else run_dir / "hf"
    written = save_hf(model, tokenizer, out_dir, cfg.task.get("dtype"))
    results = {"task": "export", "init_from": str(init), **written}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    logger.info(
        f"exported {written['architecture']} ({written['params']:,} parameters, {written['dtype']}) to "
        f"{written['out_dir']}: load it with transformers.AutoModelForCausalLM.from_pretrained(dir)"
    )
    return results
