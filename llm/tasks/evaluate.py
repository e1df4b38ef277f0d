"""task=evaluate: the downstream evaluations of conf/evals/ on any model source, with no training: a run dir, a
checkpoint dir, `latest:<task>`, a Hugging Face model dir or a hub name (`init_from`, resolved as every task
resolves it, llm/tasks/source.py). All items of every task (`evals.final_max_items`), in one process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from loguru import logger
from omegaconf import DictConfig, OmegaConf

from llm.dist.env import resolve_device
from llm.errors import ConfigError
from llm.tasks.config import JobInfo, build, read_overrides
from llm.tasks.source import open_source
from llm.utils import git_commit, seed_everything
from llm.utils.files import write_atomic


def run(cfg: DictConfig, job: JobInfo) -> dict:
    """task=evaluate (its entry): every task of `evals` scored on the init_from model; results.json holds
    eval/<task>/<metric>, eval/<task>/centered and eval/core."""
    if not (cfg.get("evals") and cfg.evals.get("tasks")):
        raise ConfigError(
            "task=evaluate has no tasks to score: choose evals=core, evals=code or your own (conf/evals/)"
        )
    evals = build(cfg.evals, "evals")  # every task's items read and checked before the model is loaded
    source = open_source(cfg, job.explicit)
    job.stop.check("after resolving init_from")
    start = time.time()
    seed_everything(cfg.seed)
    rescale = OmegaConf.to_container(cfg.extrapolation, resolve=True) if job.rescaled else None
    model, tokenizer = source.load(rescale)
    model.to(resolve_device(cfg.trainer.get("device", "auto")))
    logger.info(f"evaluate: {source.path} on {evals.describe()}")
    bf16 = cfg.trainer.get("precision") == "bf16" and next(model.parameters()).is_cuda
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else None
    scores = evals.run(model, tokenizer, final=True, autocast=autocast)
    results = {
        "task": "evaluate",
        "init_from": str(source.path),
        **scores,
        "eval_seconds": round(evals.seconds, 2),
        "wall_seconds": round(time.time() - start, 2),
        "overrides": read_overrides(job.run_dir),
        "git_commit": git_commit(Path(__file__).parent),
    }
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(job.run_dir) / "results.json", json.dumps(results, indent=2))
    for key, value in scores.items():
        logger.info(f"{key} = {value:.4f}")
    headline = ", ".join(f"{k} {scores[k]:.4g}" for k in evals.headline() if k in scores)
    logger.info(f"done: evaluation in {evals.seconds:.1f}s, {headline}; results in {job.run_dir / 'results.json'}")
    return results
