"""The run dir's owner through run.py: a fresh run refuses a finished run's dir and changes nothing in it, a resume
with another seed is refused before it writes, and overwrite=true replaces the earlier run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import SMALL, read_metrics, run_cli

pytestmark = pytest.mark.integration


def _snapshot(run_dir: Path) -> dict:
    """Every file's bytes, but the lock file (whose content names the latest process that held it)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def finished(small_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    return run_dir


def test_a_fresh_run_into_a_finished_runs_dir_changes_nothing(finished, cache_dir):
    before = _snapshot(finished)
    proc = run_cli([*SMALL, "trainer.save_every=10", f"hydra.run.dir={finished}"], cache_dir, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: run dir {finished} already holds another run's checkpoints, metrics.jsonl, results.json; continue "
        f"that run with resume=auto, write somewhere else (hydra.run.dir=<new dir>), or replace it with overwrite=true"
    )
    assert _snapshot(finished) == before  # .hydra/, train.log and metrics.jsonl included


def test_resume_with_another_seed_is_refused_before_it_writes(finished, cache_dir):
    metrics = (finished / "metrics.jsonl").read_bytes()
    proc = run_cli(
        [*SMALL, "trainer.save_every=10", "resume=auto", "seed=7", "logger=none", f"hydra.run.dir={finished}"],
        cache_dir,
        check=False,
    )
    assert proc.returncode == 2
    assert "was trained with other settings (seed: checkpoint 1337 vs now 7)" in proc.stderr.strip().splitlines()[-1]
    assert (finished / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["last", "step_0000010", "step_0000020"]


def test_overwrite_replaces_the_earlier_run(finished, cache_dir):
    run_cli(
        [
            *SMALL,
            "trainer.max_steps=2",
            "trainer.log_every=1",
            "trainer.eval_every=0",
            "overwrite=true",
            f"hydra.run.dir={finished}",
        ],
        cache_dir,
    )
    assert [m["step"] for m in read_metrics(finished)] == [0, 1, 2]  # 0: the evaluation before training
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["last", "step_0000002"]
    assert json.loads((finished / "results.json").read_text())["steps"] == 2
    assert "overwrite=true" in (finished / ".hydra" / "overrides.yaml").read_text()
