"""The recipe benchmark's arithmetic and its report, on made-up evaluation curves (the runs themselves are
run.py's, tested elsewhere): time to a target interpolated between evaluations, the ratio, the table and plot."""

from __future__ import annotations

import json

import pytest

from llm.bench import recipe as bench_recipe


def _run(name, points, rnd=1):
    evals = [{"step": s, "wall_seconds": t, "val_loss": v, "val_bpb": v / 3} for s, t, v in points]
    return {
        "name": name,
        "evals": evals,
        "round": rnd,
        "steps": points[-1][0],
        "tokens_per_s": 1000.0,
        "load_before": "1.0 1.0 1.0",
        "load_after": "1.5 1.0 1.0",
        "overrides": [],
        "run_dir": name,
    }


A = [(0, 1.0, 8.0), (50, 11.0, 5.0), (100, 21.0, 4.0)]
B = [(0, 1.0, 8.0), (30, 7.0, 4.5), (60, 13.0, 3.5)]


def test_time_to_target_interpolates_between_evaluations():
    evals = _run("B", B)["evals"]
    assert bench_recipe.time_to(evals, "val_loss", 4.0) == (pytest.approx(10.0), pytest.approx(45.0))
    assert bench_recipe.time_to(evals, "val_loss", 9.0) == (1.0, 0)  # reached before the first step
    assert bench_recipe.time_to(evals, "val_loss", 3.0) == (None, None)  # never


def test_report_files(tmp_path, monkeypatch):
    curves = {"A": A, "B": B}
    monkeypatch.setattr(bench_recipe, "start_recipe", lambda name, *a, **k: name)
    monkeypatch.setattr(bench_recipe, "run_recipe", lambda name, *a, **k: _run(name, curves[name]))
    bench_recipe.main(["--b", "optim=muon trainer.max_steps=60", "--rounds", "2", "--out", str(tmp_path / "o")])
    md = (tmp_path / "o" / "recipe_bench.md").read_text()
    assert "B: `optim=muon trainer.max_steps=60`" in md and md.count("**0.48**") == 4  # 10 s / 21 s, both keys
    assert "| 0.45 |" in md  # 45 steps x 0.2 s / (100 steps x 0.2 s)
    data = json.loads((tmp_path / "o" / "recipe_bench.json").read_text())
    assert [r["round"] for r in data["rows"]] == [1, 2] and len(data["runs"]) == 4
    assert data["rows"][0]["val_loss"]["b_steps"] == pytest.approx(45.0)
    assert (tmp_path / "o" / "recipe_bench.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="not empty"):
        bench_recipe.main(["--out", str(tmp_path / "o")])


def test_plot_legend_names_the_recipes(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(bench_recipe, "plot_curves", lambda curves, path, **k: drawn.update(curves=curves, **k))
    common = ["model.n_layer=2"]
    a = {**_run("A", A), "overrides": [*common, "optim=adamw", "optim.lr=0.0031622776601683794", "+x"]}
    b = {**_run("B", B), "overrides": common}
    bench_recipe.plot([a, b, {**b, "round": 2}], tmp_path / "p.png", common)
    assert [c["label"] for c in drawn["curves"]] == [
        "A: optim=adamw optim.lr=0.00316 +x (round 1)",
        "B: defaults (round 1)",
        "B: defaults (round 2)",
    ]
    assert drawn["hline"] == (4.0, "A's final val_loss (round 1)")
