"""task=export: a trained model written as a Hugging Face model dir."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llm.export import export_model
from llm.tasks.config import JobInfo
from llm.tasks.source import open_source
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
        source.path,
        OmegaConf.to_container(cfg.extrapolation, resolve=True),
        out_dir,
        cfg.task.get("dtype"),
        cfg.task.get("merge_lora", True),
    )
    results = {"task": "export", "init_from": str(source.path), **written}
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    return results
