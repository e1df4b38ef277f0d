"""Sweeps as a workflow, through run.py -m: one dir per job, a failed job that does not stop the others, a summary
sorted by the objective with the best marked, and the same command again continuing the sweep — finished jobs
skipped, an interrupted job resumed exactly, a failed job run again."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import SMALL, read_metrics, run_cli

pytestmark = pytest.mark.integration

# 3 jobs of 4 steps (a checkpoint every 2): two learning rates and one that fails its validation; ranked by the
# downstream evaluation of a local 12-item multiple-choice task (eval/core: maximised), evaluated every 2 steps
SWEEP = [
    "-m",
    *SMALL,
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "trainer.log_every=2",
    "trainer.save_every=2",
    "logger=none",
    "task.sample.max_new_tokens=4",
    "optim.lr=1e-3,1e-2,-1",
    "optimized_metric=eval/core",
]
EVALS = "+evals.tasks.toy={source:jsonl,path:%s,type:mc,metrics:[acc,acc_norm],primary:acc_norm}"


COMPARED = ("loss", "grad_norm", "lr", "val_loss", "tokens", "eval/core", "eval/toy/acc")


def _jobs(sweep):
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def test_sweep_summary_failed_job_and_resume(cache_dir, tmp_path, small_run):
    from tests.unit.test_downstream import mc_rows, write_jsonl

    sweep = tmp_path / "sweep"
    args = [*SWEEP, EVALS % write_jsonl(tmp_path / "toy.jsonl", mc_rows()), f"hydra.sweep.dir={sweep}"]
    first = run_cli(args, cache_dir, check=False)
    assert first.returncode == 2, first.stderr[-2000:]  # the sweep finished, but says a job failed
    assert f"sweep summary: {sweep / 'sweep_summary.md'} (3 jobs; best: job " in first.stderr
    jobs = _jobs(sweep)
    assert [j.name[:2] for j in jobs] == ["0_", "1_", "2_"] and all(len(j.name) <= 122 for j in jobs)
    for job, lr in zip(jobs, ("optim.lr=0.001", "optim.lr=0.01", "optim.lr=-1")):
        assert lr in (job / ".hydra" / "overrides.yaml").read_text()
    assert (jobs[2] / "error.txt").read_text().strip() == "ConfigError: optim.lr=-1 must be a finite number > 0"
    assert not (jobs[2] / "results.json").exists()

    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["counts"] == {"done": 2, "pruned": 0, "failed": 1, "interrupted": 0}
    rows = summary["jobs"]
    assert {r["name"][:1] for r in rows[:2]} == {"0", "1"} and rows[2]["name"][:1] == "2"  # the failed job last
    assert rows[0]["best"] and rows[0]["objective"] >= rows[1]["objective"] and not rows[1]["best"]  # maximised
    assert rows[2]["status"] == "failed" and "optim.lr=-1 must be a finite number > 0" in rows[2]["error"]
    table = list(csv.reader((sweep / "sweep_summary.csv").open()))
    best = rows[0]["name"][:1]
    assert table[0][:5] == ["", "job", "status", "eval/core", "optim.lr"] and table[1][:3] == ["best", best, "done"]
    assert f"| best | {best} | done |" in (sweep / "sweep_summary.md").read_text()
    assert (sweep / "sweep.png").stat().st_size > 5000
    for row in rows[:2]:  # what a summary needs, in every finished job's results.json
        results = json.loads((sweep / row["name"] / "results.json").read_text())
        assert results["steps"] == 4 and results["wall_seconds"] > 0 and results["overrides"]
        assert results["checkpoint"].endswith("step_0000004")
        assert results["eval/core"] == row["objective"] and -1 <= results["eval/core_before"] <= 1
        assert [m["step"] for m in read_metrics(sweep / row["name"]) if "eval/core" in m] == [0, 2, 4]  # its cadence

    # job 1 "interrupted" after its step-2 checkpoint; the same command again continues the sweep
    original = read_metrics(jobs[1])
    (jobs[1] / "results.json").unlink()
    shutil.rmtree(jobs[1] / "checkpoints" / "step_0000004")
    (jobs[1] / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in original if m["step"] <= 2))
    job0_results = (jobs[0] / "results.json").read_bytes()
    again = run_cli(args, cache_dir, check=False)
    assert again.returncode == 2
    assert (jobs[0] / "results.json").read_bytes() == job0_results  # finished: skipped, untouched
    assert "sweep job already finished" in (jobs[0] / "train.log").read_text()
    log1 = (jobs[1] / "train.log").read_text()
    assert "sweep job was interrupted: resume=auto" in log1 and "step_0000002 at step 2" in log1
    resumed = read_metrics(jobs[1])
    assert [m["step"] for m in resumed] == [m["step"] for m in original] == [0, 2, 4]
    for a, b in zip(original, resumed):  # the resumed job's numbers are the uninterrupted job's, bit for bit
        assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}
    assert (jobs[2] / "error.txt").is_file()  # run again, failed again
    assert json.loads((sweep / "sweep_summary.json").read_text())["counts"]["done"] == 2

    # llm.compare on the sweep dir and, through a glob, the shared small run beside a sweep job: the table's values
    # are results.json's, the differing overrides are the columns, and the plot is drawn
    from llm.compare import main as compare_main

    out = tmp_path / "compare"
    assert compare_main([str(sweep), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["run"] for r in rows] == ["0", "1", "2"] and [r["status"] for r in rows] == ["done", "done", "failed"]
    assert [r["optim.lr"] for r in rows] == ["0.001", "0.01", "-1"]
    for row in rows[:2]:
        results = json.loads((Path(row["dir"]) / "results.json").read_text())
        for key in ("val_loss", "val_bpb", "steps", "tokens_per_s", "wall_seconds"):
            assert row[key] == str(results[key]), key
    assert rows[2]["val_loss"] == "" and (out / "compare.png").stat().st_size > 10000
    assert "| 0   | done   | 0.001    |" in (out / "compare.md").read_text()

    assert compare_main([str(small_run), str(sweep / "0_*"), "--out", str(out)]) == 0
    header, *rows = list(csv.reader((out / "compare.csv").open()))
    assert header[:2] == ["run", "status"] and "trainer.max_steps" in header and "model.n_layer" not in header
    steps = header.index("trainer.max_steps")
    assert [r[steps] for r in rows] == ["20", "4"]  # as set, and set again later on the command line (the last wins)
