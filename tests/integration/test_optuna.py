"""The Optuna sweeper end to end (hydra/sweeper=optuna): a 4-trial search killed mid-way and started again by
the same command ends with exactly 4 finished trials, none of the finished ones run again; a hopeless trial is
pruned before its last step; a failing trial is marked failed and the search goes on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, SMALL, run_cli, run_env

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.integration

# trials 0-2 enqueued: a good lr, a hopeless one (pruned at its first evaluation), one that fails validation;
# trial 3 drawn from the same choice
SEARCH = [
    "-m",
    *SMALL,
    "hydra/sweeper=optuna",
    "optim=adamw",  # lr 30 diverges at once with AdamW (pruned at the first evaluation)
    "hydra.sweeper.n_trials=4",
    "hydra.sweeper.sampler=random",
    "hydra.sweeper.seed=0",
    "hydra.sweeper.n_startup_trials=1",
    "hydra.sweeper.enqueue=[{optim.lr:0.01},{optim.lr:30.0},{optim.lr:-1}]",
    "optim.lr=choice(0.01,30.0,-1)",
    "trainer.max_steps=6",
    "trainer.eval_every=2",
    "trainer.log_every=2",
    "trainer.save_every=2",
    "trainer.eval_batches=2",
    "logger=none",
    "task.sample.max_new_tokens=4",
]


def test_search_survives_a_kill_prunes_and_marks_failures(cache_dir, tmp_path):
    sweep = tmp_path / "search"
    args = [*SEARCH, f"hydra.sweep.dir={sweep}"]
    env = run_env(cache_dir)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while len(list(sweep.glob("*/results.json"))) < 2:  # trials 0 and 1 finished: kill in the middle of the rest
        assert proc.poll() is None and time.time() < deadline, "the search ended before two trials finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.parent.name for p in sweep.glob("*/results.json")}

    again = run_cli(args, cache_dir, check=False)
    assert again.returncode == 2, again.stderr[-2000:]  # it finished; one trial failed
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    states = {t.number: t.state.name for t in trials}
    assert [states[n] for n in (0, 1, 2)] == ["COMPLETE", "PRUNED", "FAIL"], states
    jobs = {int(p.name.split("_")[0]): p for p in sweep.iterdir() if (p / ".hydra").is_dir()}
    assert sorted(jobs) == [0, 1, 2, 3]  # one job dir per trial, numbered by the trial
    for name in first:  # a trial that had finished never trained again (at most skipped, if not yet told)
        assert (sweep / name / "train.log").read_text().count("instantiating model") == 1, name

    pruned = json.loads((jobs[1] / "results.json").read_text())
    assert states[1] == "PRUNED" and pruned["steps"] < 6 and pruned["stopped_early"].startswith("pruned at step 2")
    assert (jobs[1] / "checkpoints" / "step_0000002").is_dir()  # pruned trials keep their dir and checkpoint
    assert states[2] == "FAIL" and "optim.lr=-1" in (jobs[2] / "error.txt").read_text()
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    counts = {"done": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}
    assert summary["counts"] == {**{k: list(states.values()).count(v) for k, v in counts.items()}, "interrupted": 0}
    assert summary["best"]["objective"] == pytest.approx(study.best_value)
