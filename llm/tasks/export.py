"""task=export: a trained model written as a Hugging Face model dir."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from llm.hf import save_hf
from llm.tasks.config import JobInfo
from llm.tasks.source import open_source
from llm.utils.files import write_atomic


def run(cfg: DictConfig, job: JobInfo) -> dict:
    """task=export (its entry): the init_from model (its RoPE scaling, or extrapolation=... when set) as a Hugging
    Face model dir, by default `hf/` in this run's dir; results.json says what was written."""
    source = open_source(cfg, job.explicit)
    job.stop.check("after resolving init_from")
    run_dir, init = job.run_dir, source.path
    rope_scaling = OmegaConf.to_container(cfg.extrapolation, resolve=True)
    model, tokenizer = source.load(rope_scaling)
    out_dir = Path(str(cfg.task.out_dir)).expanduser() if cfg.task.get("out_dir") else run_dir / "hf"
    written = save_hf(model, tokenizer, out_dir, cfg.task.get("dtype"))
    results = {"task": "export", "init_from": str(init), **written}
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    logger.info(
        f"exported {written['architecture']} ({written['params']:,} parameters, {written['dtype']}) to "
        f"{written['out_dir']}: load it with transformers.AutoModelForCausalLM.from_pretrained(dir)"
    )
    return results
