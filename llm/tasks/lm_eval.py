"""task=lm_eval: a model scored by EleutherAI's lm-evaluation-harness (llm/hf/harness.py)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from llm.data.chat import reserved_chat_template
from llm.errors import ConfigError
from llm.hf import harness, save_hf
from llm.tasks.config import JobInfo, build, read_overrides
from llm.tasks.source import open_source
from llm.utils import git_commit
from llm.utils.files import write_atomic


def run(cfg: DictConfig, job: JobInfo) -> dict:
    """task=lm_eval (its entry): lm-eval's scores of the init_from model on task.tasks. An HF model dir is scored
    as it is (unless extrapolation=... rescales it); a run or checkpoint is exported to `hf/` in this run's dir
    first, as task=export does. Our tasks' files go to `lm_eval/`, lm-eval's per-example records to
    `lm_eval/samples/`. Everything is checked (lm-eval itself, names, settings, rows, chat template) before
    anything is written."""
    version = harness.require_lm_eval()  # before any work
    source = open_source(cfg, job.explicit)
    job.stop.check("after resolving init_from")
    start, t, run_dir = time.time(), cfg.task, job.run_dir
    names = harness.check_task_names(OmegaConf.to_container(t.tasks) if OmegaConf.is_list(t.tasks) else t.tasks)
    device = harness.check_settings(names, t.limit, t.num_fewshot, t.batch_size, t.max_new_tokens, t.device)
    manager = harness.task_manager(names)
    init, ours = source.path, [n for n in names if n in harness.OUR_TASKS]
    reuse = source.hf and not job.rescaled
    model = None
    if reuse:
        tokenizer = source.tokenizer()
    else:
        model, tokenizer = source.load(OmegaConf.to_container(cfg.extrapolation, resolve=True))
        reserved_chat_template(tokenizer)  # as save_hf does: the export's tokenizer
    examples = []
    if ours and t.get("rows") is None:
        raise ConfigError(
            f"task.rows is null (post_data.val): {', '.join(ours)} are made of held-out rows; set "
            f"post_data.val (or task.rows), or name only lm-eval's tasks in task.tasks"
        )
    if ours:
        rows = build(t.rows, "held-out rows")
        logger.info(f"lm_eval: {', '.join(ours)} from {rows.describe()}")
        examples = harness.held_out_examples(rows.rows(), tokenizer, str(init))
    if reuse:
        model_dir = init
    else:
        model_dir = Path(save_hf(model, tokenizer, run_dir / "hf", t.get("dtype"))["out_dir"])
        logger.info(f"lm_eval: exported {init} to {model_dir}")
    task_dir = run_dir / "lm_eval"
    counts = harness.write_tasks(task_dir, examples, tokenizer, ours, t.max_new_tokens) if ours else {}
    logger.info(f"lm_eval {version}: {', '.join(names)} on {model_dir} ({device}, limit {t.limit})")
    scores, samples = harness.run_lm_eval(
        model_dir, harness.task_specs(names, task_dir), manager, t.limit, t.batch_size, device, t.num_fewshot, cfg.seed
    )
    harness.write_samples(task_dir / "samples", samples)
    shutil.rmtree(task_dir / harness.DATASETS_CACHE, ignore_errors=True)  # a copy of our JSONL files
    results = {
        "task": "lm_eval",
        "init_from": str(init),
        "model_dir": str(model_dir),
        "exported": not reuse,
        "lm_eval_version": version,
        "tasks": names,
        "limit": t.limit,
        "num_fewshot": t.num_fewshot,
        "examples": counts,
        **scores,
        "wall_seconds": round(time.time() - start, 2),
        "overrides": read_overrides(run_dir),
        "git_commit": git_commit(Path(__file__).parent),
    }
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    for key, value in scores.items():
        logger.info(f"{key} = {value}")
    return results
