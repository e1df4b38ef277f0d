"""A sweep trial's side of Optuna pruning: after each evaluation the trial reports its objective to its study,
and when the study's pruner gives up on it the run finishes early (saved, results.json says `stopped_early`).

The Optuna sweeper (hydra_plugins/llm_optuna_sweeper) starts each trial as a job with the override `+trial=<n>`;
the job finds the study from the sweeper's settings (`storage`, `study_name`). Optuna is imported only here and
only for such trials (the `sweep` extra).
"""

from __future__ import annotations

from pathlib import Path

from llm.errors import ConfigError

PRUNERS = ("median", "percentile", "hyperband", "none")


def make_pruner(optuna, pruner: str = "median", n_startup_trials: int = 2, n_warmup_steps: int = 0):
    """The study's pruner. Optuna does not store it with the study: the sweeper and each trial build the same one."""
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    if pruner == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"hydra.sweeper.pruner={pruner!r} is not allowed; choose one of {list(PRUNERS)}")


def default_storage(sweep_dir: str | Path) -> str:
    """Where a sweep's study lives unless `hydra.sweeper.storage` says otherwise: SQLite in the sweep dir."""
    return f"sqlite:///{Path(sweep_dir).absolute() / 'optuna.db'}"


SQLITE_WAIT_S = 120  # how long a writer waits for SQLite's lock (Python's default, 5 s, fails busy sweeps)


def open_storage(optuna, url: str):
    """The study's storage for `url`. SQLite, the default, lets one writer in at a time: with many trials at once
    (`n_jobs`, SLURM) each report waits for the lock rather than failing with "database is locked". For hundreds
    of parallel trials, or a sweep dir on a network file system (NFS locks are unreliable), give
    `hydra.sweeper.storage` a server database URL (postgresql://..., mysql://...)."""
    if url.startswith("sqlite:"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_WAIT_S}})
    return url


class TrialPruner:
    """`early_stop` for the Trainer: reports `metric` at each evaluation, returns a reason once the study's pruner
    says the trial is hopeless."""

    def __init__(
        self,
        storage: str,
        study_name: str,
        number: int,
        metric: str,
        pruner: str = "median",
        n_startup_trials: int = 2,
        n_warmup_steps: int = 0,
    ):
        try:
            import optuna  # the `sweep` extra
        except ImportError as e:
            raise ConfigError("trial: pruning needs Optuna: pip install -e '.[sweep]'") from e
        study = optuna.load_study(
            study_name=study_name,
            storage=open_storage(optuna, storage),
            pruner=make_pruner(optuna, pruner, n_startup_trials, n_warmup_steps),
        )
        trial_id = next((t._trial_id for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if trial_id is None:
            raise ConfigError(f"trial={number}: no such trial in study {study_name!r} ({storage})")
        self.trial, self.metric = optuna.trial.Trial(study, trial_id), metric

    def __call__(self, step: int, metrics: dict) -> str | None:
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)):
            return None
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            return f"pruned at step {step}: {self.metric} {value:.4g} (the study's pruner gave up on this trial)"
        return None
