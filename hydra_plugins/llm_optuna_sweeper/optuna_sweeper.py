"""An Optuna search as a Hydra sweeper: `python run.py -m hydra/sweeper=optuna ...` or `hparams_search=<preset>`.

Search spaces are written as Hydra's sweep overrides, on the command line or in `hydra.sweeper.params`:
`interval(a, b)` (a float), `tag(log, interval(a, b))` (log scale), `tag(int, interval(a, b))` (an integer),
`range(a, b[, step])` (b excluded), `choice(x, y, ...)` or `x,y,...` (categorical). Plain overrides go to every
trial; `enqueue` lists parameter sets to try first.

The study lives in SQLite in the sweep dir unless `storage` says otherwise, so the same command again continues
it: `n_trials` counts every finished trial (complete, pruned or failed) of the study, a trial that an earlier
attempt left running is run again with its own parameters and job dir (which resumes from its checkpoint; one
killed before it had all of its parameters gets the rest), and no finished trial runs twice. Each trial is one
job dir `<trial number>_<overrides>`; it gets `+trial=<number>`, reports its objective (`optimized_metric`) at
every evaluation, and the pruner (median by default) may finish it early. A failed trial (its error in error.txt)
or a non-finite objective is marked failed and the search goes on.
Optuna is imported when a search starts, not when Hydra scans its plugins (the `sweep` extra).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from llm.errors import ConfigError, LLMError
from llm.sweep.pruning import PRUNERS, default_storage, make_pruner, open_storage
from llm.sweep.summary import direction_of

SAMPLERS = ("tpe", "random")


def distribution(override: Override, optuna) -> Any:
    """The Optuna distribution of one sweep override (see the module docstring for the syntax)."""
    sweep, log = override.value(), "log" in override.value().tags
    key = override.get_key_element()
    if isinstance(sweep, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"search space of {key}: range({sweep.start}, {sweep.stop}) is empty")
        if all(isinstance(v, int) for v in values):
            return optuna.distributions.IntDistribution(
                values[0], values[-1], log=log, step=1 if log else int(sweep.step)
            )
        return optuna.distributions.FloatDistribution(values[0], values[-1], log=log, step=None if log else sweep.step)
    if isinstance(sweep, IntervalSweep):
        if not sweep.start < sweep.end or (log and sweep.start <= 0):
            raise ConfigError(
                f"search space of {key}: interval({sweep.start}, {sweep.end}) must have start < end"
                + (" and start > 0 on a log scale" if log else "")
            )
        if "int" in sweep.tags:  # Hydra reads interval bounds as floats
            return optuna.distributions.IntDistribution(int(sweep.start), int(sweep.end), log=log)
        return optuna.distributions.FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    raise ConfigError(f"search space of {key}: {override.input_line} is not a search space")


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        n_trials: int = 20,
        n_jobs: int = 1,
        direction: str | None = None,
        storage: str | None = None,
        study_name: str = "sweep",
        sampler: str = "tpe",
        seed: int | None = None,
        pruner: str = "median",
        n_startup_trials: int = 2,
        n_warmup_steps: int = 0,
        params: dict | None = None,
        enqueue: list | None = None,
    ):
        self.n_trials, self.n_jobs, self.direction, self.storage = n_trials, n_jobs, direction, storage
        self.study_name, self.sampler, self.seed, self.pruner = study_name, sampler, seed, pruner
        self.n_startup_trials, self.n_warmup_steps = n_startup_trials, n_warmup_steps
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.enqueue = [dict(p) for p in enqueue or []]  # parameter sets to try first, in order
        self.config = self.launcher = self.hydra_context = None

    def _validate(self) -> None:
        for key, low in (("n_trials", 1), ("n_jobs", 1), ("n_startup_trials", 0), ("n_warmup_steps", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"hydra.sweeper.{key}={value!r} must be a whole number >= {low}")
        for key, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS), ("direction", ("minimize", "maximize", None))):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"hydra.sweeper.{key}={getattr(self, key)!r} is not allowed; choose one of {list(allowed)}"
                )

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _study(self, optuna, sweep_dir: Path):
        metric = self.config.get("optimized_metric") or "val_loss"
        storage = open_storage(optuna, self.storage or default_storage(sweep_dir))
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            load_if_exists=True,
            direction=direction_of(metric, self.direction),
            pruner=make_pruner(optuna, self.pruner, self.n_startup_trials, self.n_warmup_steps),
        )
        # the sampler's seed moves on with the trials already in the study: a search started again does not
        # replay the draws of its first attempt
        seed = None if self.seed is None else self.seed + len(study.get_trials(deepcopy=False))
        study.sampler = (
            optuna.samplers.TPESampler(seed=seed) if self.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)
        )
        return study

    def _enqueue(self, study, space: dict) -> None:
        for params in self.enqueue:
            for key, value in params.items():
                dist = space.get(key)
                if dist is None or not _contains(dist, value):
                    raise ConfigError(
                        f"hydra.sweeper.enqueue: {key}={value!r} is not in the search space ({dist or 'not searched'})"
                    )
            study.enqueue_trial(params, skip_if_exists=True)

    def _space(self, arguments: list[str]) -> tuple[list[str], dict]:
        import optuna

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        given = parser.parse_overrides(list(arguments))
        keys = {o.get_key_element() for o in given}
        defaults = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items() if k not in keys])
        fixed, space = [], {}
        for override in [*defaults, *given]:
            if override.is_sweep_override():
                space[override.get_key_element()] = distribution(override, optuna)
            else:
                fixed.append(override.input_line)
        if not space:
            raise ConfigError(
                "hydra/sweeper=optuna: nothing to search; give hydra.sweeper.params or a sweep override "
                "such as optim.lr='tag(log, interval(1e-4, 1e-2))'"
            )
        return fixed, space

    def sweep(self, arguments: list[str]) -> list:
        try:
            import optuna
        except ImportError:
            _fail("hydra/sweeper=optuna needs Optuna: pip install -e '.[sweep]'")
        try:
            return self._sweep(arguments, optuna)
        except LLMError as e:  # a bad search setting: one line, as run.py prints errors (debug=true: traceback)
            if self.config.get("debug"):
                raise
            _fail(str(e))

    def _sweep(self, arguments: list[str], optuna) -> list:
        self._validate()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        fixed, space = self._space(arguments)
        study = self._study(optuna, sweep_dir)
        self._enqueue(study, space)
        returns = []
        while True:
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state.is_finished() for t in trials)
            if finished >= self.n_trials:
                break
            # trials an interrupted earlier attempt left running go first, with their own parameters (one killed
            # before it had all of them gets the rest now; one with parameters outside this space is failed)
            stale = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            for trial in [t for t in stale if not set(t.params) <= set(space)]:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            batch = [_all_params(study, t, space, optuna) for t in stale if set(t.params) <= set(space)]
            batch = batch[: self.n_jobs]
            for _ in range(min(self.n_jobs, self.n_trials - finished) - len(batch)):
                batch.append(study.ask(space))
            returns.extend(self._run(study, batch, fixed, optuna))
        write_importance(study, sweep_dir / "importance.png", optuna)
        return returns

    def _run(self, study, batch: list, fixed: list[str], optuna) -> list:
        """Launch the batch's trials, each in a job dir numbered by its trial (trials with consecutive numbers in
        one launch: a parallel launcher runs them at once), and tell the study how each ended."""
        batch, results = sorted(batch, key=lambda t: t.number), []
        runs = [[batch[0]]] if batch else []
        for trial in batch[1:]:  # runs of consecutive trial numbers
            if trial.number == runs[-1][-1].number + 1:
                runs[-1].append(trial)
            else:
                runs.append([trial])
        for run in runs:
            jobs = self.launcher.launch(
                [[*fixed, *(f"{k}={_value(v)}" for k, v in t.params.items()), f"+trial={t.number}"] for t in run],
                initial_job_idx=run[0].number,
            )
            for trial, job in zip(run, jobs):
                value = job.return_value if job.status.name == "COMPLETED" else None
                if _stopped_early(job):
                    study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
                elif isinstance(value, (int, float)) and math.isfinite(value):
                    study.tell(trial.number, float(value))
                else:  # failed (error.txt in its dir) or a non-finite objective
                    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            results.extend(jobs)
        return results


def _all_params(study, frozen, space: dict, optuna):
    """A trial left running with every parameter of `space`: one that an earlier attempt was killed in the middle
    of asking (between `ask` and its last parameter, before any job dir) gets the missing ones as `ask` gives them
    (an enqueued trial its own values, otherwise the sampler's), so it runs under its own number."""
    if set(frozen.params) == set(space):
        return frozen
    trial = optuna.trial.Trial(study, frozen._trial_id)
    for name, distribution in space.items():
        trial._suggest(name, distribution)  # what study.ask(space) calls; a parameter already set is kept
    return study._storage.get_trial(frozen._trial_id)


def write_importance(study, path: Path, optuna, min_trials: int = 10) -> dict | None:
    """Optuna's parameter importances as a bar chart, once there are enough complete trials for them to mean
    something (and more than one parameter). Returns them, or None when not drawn."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < min_trials or len({k for t in complete for k in t.params}) < 2:
        return None
    importances = optuna.importance.get_param_importances(study)
    import matplotlib  # plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(importances)))
    ax.barh(list(importances)[::-1], list(importances.values())[::-1])
    ax.set(xlabel="importance (share of the objective's variance)", title=f"{len(complete)} complete trials")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return importances


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _value(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _contains(dist, value) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def _stopped_early(job) -> bool:
    """Whether the trial's run finished early (pruned): its results.json says so."""
    try:
        results = Path(job.hydra_cfg.hydra.runtime.output_dir) / "results.json"
        return results.is_file() and "stopped_early" in json.loads(results.read_text())
    except (AttributeError, OSError, ValueError):
        return False
