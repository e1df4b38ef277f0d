"""Sweep pieces in-process: the summary of a sweep dir (status of each job, sorted by the objective in its
direction, the best marked, failures with their error) and the Optuna sweeper's search spaces."""

from __future__ import annotations

import csv
import json

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from llm.errors import ConfigError
from llm.sweep.pruning import SQLITE_WAIT_S, default_storage, open_storage
from llm.sweep.summary import direction_of, summarize


def _job(sweep, name, overrides, results=None, error=None, checkpoint=False):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
        (job / "metrics.jsonl").write_text(
            json.dumps({"step": 0, "val_loss": 3.0})
            + "\n[1, 2]\n{torn\n"  # lines the plot skips: not a record, not JSON
            + json.dumps({"step": 10, "val_loss": results.get("val_loss", 2.0)})
            + "\n"
        )
    if error:
        (job / "error.txt").write_text(error + "\n")
    if checkpoint:
        (job / "checkpoints" / "step_0000010").mkdir(parents=True)


@pytest.mark.parametrize(
    "metric,direction,order", [("val_loss", "minimize", ["1", "0", "3"]), ("exact_match", "maximize", ["0", "1", "3"])]
)
def test_summary_sorts_marks_and_explains(tmp_path, metric, direction, order):
    _job(tmp_path, "0_optim.lr=0.001", ["optim.lr=0.001"], {"val_loss": 2.5, "exact_match": 0.9, "steps": 10})
    _job(tmp_path, "1_optim.lr=0.01", ["optim.lr=0.01"], {"val_loss": 2.0, "exact_match": 0.5, "steps": 10})
    _job(tmp_path, "2_optim.lr=-1", ["optim.lr=-1"], error="ConfigError: optim.lr=-1 must be a positive number")
    _job(
        tmp_path,
        "3_optim.lr=0.1",
        ["optim.lr=0.1"],
        {"val_loss": 9.0, "exact_match": 0.0, "steps": 4, "stopped_early": "pruned at step 4"},
    )
    _job(tmp_path, "4_optim.lr=0.3", ["optim.lr=0.3"], checkpoint=True)
    summary = summarize(tmp_path, metric)
    assert summary["direction"] == direction == direction_of(metric)
    assert summary["counts"] == {"done": 2, "pruned": 1, "failed": 1, "interrupted": 1}
    names = [j["name"].split("_")[0] for j in summary["jobs"]]
    assert names[:3] == order and names[3:] == ["2", "4"]  # no objective: last, in job order
    assert summary["best"]["name"].startswith(order[0]) and summary["jobs"][0]["best"]
    failed = next(j for j in summary["jobs"] if j["status"] == "failed")
    assert failed["error"] == "ConfigError: optim.lr=-1 must be a positive number"
    rows = list(csv.reader((tmp_path / "sweep_summary.csv").open()))
    assert rows[0][:5] == ["", "job", "status", metric, "optim.lr"] and rows[1][:3] == ["best", order[0], "done"]
    table = (tmp_path / "sweep_summary.md").read_text()
    assert f"sorted by {metric} ({direction})" in table and "| pruned |" in table and "| interrupted |" in table
    assert (tmp_path / "sweep.png").stat().st_size > 5000


def test_empty_sweep_dir_writes_nothing(tmp_path):
    assert summarize(tmp_path)["jobs"] == [] and not (tmp_path / "sweep_summary.md").exists()


def _space(text):
    optuna = pytest.importorskip("optuna")
    from hydra_plugins.llm_optuna_sweeper.optuna_sweeper import distribution

    (override,) = OverridesParser.create().parse_overrides([text])
    return distribution(override, optuna), optuna.distributions


def test_search_space_syntax():
    dist, d = _space("optim.lr=tag(log, interval(1e-4, 1e-2))")
    assert dist == d.FloatDistribution(1e-4, 1e-2, log=True)
    assert _space("optim.weight_decay=interval(0.0, 0.2)")[0] == d.FloatDistribution(0.0, 0.2)
    assert _space("model.n_layer=tag(int, interval(2, 8))")[0] == d.IntDistribution(2, 8)
    assert _space("optim.warmup_steps=range(0, 101, 25)")[0] == d.IntDistribution(0, 100, step=25)
    assert _space("model=choice(tiny, 125m)")[0] == d.CategoricalDistribution(["tiny", "125m"])
    assert _space("task.objective.beta=0.1,0.3")[0] == d.CategoricalDistribution([0.1, 0.3])
    with pytest.raises(ConfigError, match="search space of optim.lr: interval.* start > 0 on a log scale"):
        _space("optim.lr=tag(log, interval(0, 1))")
    with pytest.raises(ConfigError, match="search space of x: range.* is empty"):
        _space("x=range(5, 5)")


def test_importance_plot_only_when_it_means_something(tmp_path):
    optuna = pytest.importorskip("optuna")
    from hydra_plugins.llm_optuna_sweeper.optuna_sweeper import write_importance

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = {"lr": optuna.distributions.FloatDistribution(0, 1), "wd": optuna.distributions.FloatDistribution(0, 1)}
    for i in range(12):
        trial = study.ask(space)
        study.tell(trial, 10 * trial.params["lr"] + 0.01 * trial.params["wd"])
        if i == 8:  # too few trials so far: no plot
            assert write_importance(study, tmp_path / "importance.png", optuna) is None
    importances = write_importance(study, tmp_path / "importance.png", optuna)
    assert set(importances) == {"lr", "wd"} and importances["lr"] > importances["wd"]
    assert (tmp_path / "importance.png").stat().st_size > 2000


def test_sqlite_study_storage_waits_for_the_lock(tmp_path):
    """Parallel trials share one SQLite file: a writer must wait for the lock (minutes), not fail after Python's
    default 5 s with "database is locked"; other URLs go to Optuna as they are."""
    optuna = pytest.importorskip("optuna")
    storage = open_storage(optuna, default_storage(tmp_path))
    with storage.engine.connect() as connection:  # the busy timeout SQLite itself applies, in ms
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_WAIT_S * 1000
    assert open_storage(optuna, "postgresql://host/db") == "postgresql://host/db"


def test_a_trial_killed_while_being_asked_gets_its_parameters(tmp_path):
    """A search killed between `ask` and the trial's parameters leaves it running with none: the next attempt runs
    it under its own number with the parameters `ask` gives (an enqueued trial its own), not as a failure."""
    optuna = pytest.importorskip("optuna")
    from hydra_plugins.llm_optuna_sweeper.optuna_sweeper import _all_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {
        "optim.lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True),
        "trainer.batch_size": optuna.distributions.CategoricalDistribution([8, 16]),
    }
    study = optuna.create_study(storage=default_storage(tmp_path))
    study.enqueue_trial({"optim.lr": 0.5, "trainer.batch_size": 16})
    enqueued, drawn = study.ask(), study.ask()  # RUNNING, no parameters yet: what the kill leaves
    assert enqueued.params == drawn.params == {}
    frozen = {t.number: t for t in study.get_trials()}
    assert _all_params(study, frozen[0], space, optuna).params == {"optim.lr": 0.5, "trainer.batch_size": 16}
    params = _all_params(study, frozen[1], space, optuna).params
    assert set(params) == set(space) and 1e-4 <= params["optim.lr"] <= 1.0 and params["trainer.batch_size"] in (8, 16)
    assert all(t.state.name == "RUNNING" for t in study.get_trials())  # still to be run, under numbers 0 and 1


def test_sweep_plot_reads_well(tmp_path, monkeypatch):
    """Legend values with the digits that tell them apart (not 0.0031622776601683794), a log axis labelled at the
    swept values with no minor labels on top of them, a pruned trial dashed and named as such."""
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    for i, lr in enumerate(("0.0031622776601683794", "0.01", "0.031622776601683794")):
        results = {"val_loss": 3 - i, "steps": 10, **({"stopped_early": "pruned at step 5"} if i == 0 else {})}
        _job(tmp_path, f"{i}_optim.lr={lr}", [f"optim.lr={lr}"], results)
    summarize(tmp_path, log_params=("optim.lr",))
    scatter, curves = figures[0].axes[:2]
    assert [t.get_text() for t in scatter.get_xticklabels()] == ["0.00316", "0.01", "0.0316"]
    assert not any(t.get_text() for t in scatter.xaxis.get_minorticklabels())
    legend = [t.get_text() for t in curves.get_legend().get_texts()]
    assert legend == ["* optim.lr=0.0316", "optim.lr=0.01", "optim.lr=0.00316 (pruned)"]
    assert [line.get_linestyle() for line in curves.lines] == ["-", "-", "--"]


def test_a_trial_pruned_at_its_last_evaluation_ran_to_the_end(tmp_path):
    """The pruner's verdict on the last step's evaluation stops nothing: the trial is done, not pruned."""
    from tests.unit.test_muon import _fit, _Tokens

    data = _Tokens(tmp_path / "t.bin")
    results = _fit(
        tmp_path / "run", data, 6, early_stop=lambda step, _: f"pruned at step {step}" if step == 6 else None
    )
    assert results["steps"] == 6 and "stopped_early" not in results
    assert "stopped_early" not in json.loads((tmp_path / "run" / "results.json").read_text())
