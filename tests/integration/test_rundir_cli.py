"""The run dir's owner through run.py: a fresh run refuses a finished run's dir and changes nothing in it, a resume
with another seed is refused before it writes, and overwrite=true replaces the earlier run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import SMALL, read_metrics, run_cli_batch

pytestmark = pytest.mark.integration
SHARES_RUNS = pytest.mark.xdist_group("rundir_cli")  # the tests of the module's batch of runs: on one worker


def _snapshot(run_dir: Path) -> dict:
    """Every file's bytes, but the lock file (whose content names the latest process that held it)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# the three runs of the module, each on its own copy of the small run: (run.py arguments besides SMALL and the dir)
RUNS = {
    "fresh": ["trainer.save_every=10"],
    "other_seed": ["trainer.save_every=10", "resume=auto", "seed=7", "logger=none"],
    "overwrite": ["trainer.max_steps=2", "trainer.log_every=1", "trainer.eval_every=0", "overwrite=true"],
}


@pytest.fixture(scope="module")
def runs(small_run, cache_dir, tmp_path_factory) -> dict:
    """Each of RUNS through run.py on a fresh copy of the small run, in one interpreter (run_cli_batch):
    {name: (result, run dir, its files before the run)}."""
    dirs = {name: tmp_path_factory.mktemp(name) / "run" for name in RUNS}
    for run_dir in dirs.values():
        shutil.copytree(small_run, run_dir)
    before = {name: _snapshot(run_dir) for name, run_dir in dirs.items()}
    results = run_cli_batch([[*SMALL, *args, f"hydra.run.dir={dirs[name]}"] for name, args in RUNS.items()], cache_dir)
    return {name: (result, dirs[name], before[name]) for name, result in zip(RUNS, results)}


@SHARES_RUNS
def test_a_fresh_run_into_a_finished_runs_dir_changes_nothing(runs):
    result, finished, before = runs["fresh"]
    assert result["returncode"] == 2
    assert result["stderr"].strip().splitlines()[-1] == (
        f"error: run dir {finished} already holds another run's checkpoints, metrics.jsonl, results.json; continue "
        f"that run with resume=auto, write somewhere else (hydra.run.dir=<new dir>), or replace it with overwrite=true"
    )
    assert _snapshot(finished) == before  # .hydra/, train.log and metrics.jsonl included


@SHARES_RUNS
def test_resume_with_another_seed_is_refused_before_it_writes(runs):
    result, finished, before = runs["other_seed"]
    assert result["returncode"] == 2
    assert (
        "was trained with other settings (seed: checkpoint 1337 vs now 7)" in result["stderr"].strip().splitlines()[-1]
    )
    assert (finished / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["last", "step_0000010", "step_0000020"]


@SHARES_RUNS
def test_overwrite_replaces_the_earlier_run(runs):
    result, finished, _ = runs["overwrite"]
    assert result["returncode"] == 0, result["stderr"][-3000:]
    assert [m["step"] for m in read_metrics(finished)] == [0, 1, 2]  # 0: the evaluation before training
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["last", "step_0000002"]
    assert json.loads((finished / "results.json").read_text())["steps"] == 2
    assert "overwrite=true" in (finished / ".hydra" / "overrides.yaml").read_text()
