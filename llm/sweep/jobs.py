"""A sweep job's side of a sweep: continuing the job an earlier attempt of the same sweep left behind, recording a
failed job's error for the summary, and an Optuna trial's settings (where its study is)."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, open_dict

from llm.checkpoint.files import list_checkpoints
from llm.errors import ConfigError
from llm.failures import about
from llm.rundir import owner
from llm.sweep.pruning import default_storage
from llm.sweep.summary import ERROR_FILE


def continue_sweep_job(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict | None:
    """A sweep job's dir from an earlier attempt of the same sweep: its results when it finished (the job is
    skipped), else `resume=auto` when it saved a checkpoint (it was interrupted); a job that failed starts again."""
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    results_file = run_dir / "results.json"
    if results_file.is_file():
        with about(results_file):
            results = json.loads(results_file.read_text())
        if results.get("overrides", list(overrides)) != list(overrides):
            raise ConfigError(
                f"{run_dir} holds a finished run of other overrides ({' '.join(results['overrides'])});"
                f" use a new hydra.sweep.dir"
            )
        logger.info(f"sweep job already finished ({results_file}): skipped")
        return results
    if not cfg.resume and list_checkpoints(run_dir):  # none usable: resume=auto refuses (the job is marked failed)
        logger.info("sweep job was interrupted: resume=auto")
        with open_dict(cfg):
            cfg.resume = "auto"
    elif not cfg.resume and owner.artefacts(run_dir):  # an attempt that failed before its first checkpoint
        logger.info("sweep job failed before: started over (overwrite=true)")
        with open_dict(cfg):
            cfg.overwrite = True
    return None


def record_failure(run_dir: Path, error: BaseException) -> None:
    """A failed sweep job's one-line error, in its dir, for the sweep summary (the sweep goes on)."""
    Path(run_dir, ERROR_FILE).write_text(f"{type(error).__name__}: {error}".splitlines()[0] + "\n")


def trial_settings(cfg: DictConfig, hydra: DictConfig) -> dict:
    """An Optuna trial's `+trial=<n>` turned into what its pruner needs: its number, its study (the sweeper's
    `study_name` and `storage`), the metric it reports, and the sweeper's pruner settings."""
    sweeper = hydra.get("sweeper") or {}
    return {
        "number": int(cfg.trial),
        "study_name": sweeper.get("study_name") or "sweep",
        "storage": sweeper.get("storage") or default_storage(hydra.sweep.dir),
        "metric": cfg.get("optimized_metric") or "val_loss",
        **{k: sweeper[k] for k in ("pruner", "n_startup_trials", "n_warmup_steps") if k in sweeper},
    }
