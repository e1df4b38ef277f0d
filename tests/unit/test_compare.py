"""llm.compare's parts on hand-written run dirs (the real runs are in tests/integration/test_sweep.py): the
overrides that differ and their short values, the metrics a run has, tokens at evaluations without a record of
them, runs found under dirs and globs, and a bad argument as one line."""

from __future__ import annotations

import json

import yaml

from llm.compare import compare, find_runs, main, read_run, short_values


def make_run(path, overrides, results=None, records=(), choices=None):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.003, "betas": [0.9, 0.95]}}))
    runtime = {"choices": {"optim": "muon", "model": "tiny", **(choices or {}), "hydra/launcher": "basic"}}
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": runtime}}))
    if results is not None:
        (path / "results.json").write_text(json.dumps(results))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "los')
    return path


def test_short_values_keep_different_values_different():
    assert short_values(["0.0031622776601683794", "0.01", "1e-3"]) == ["0.00316", "0.01", "0.001"]
    assert short_values(["0.0031", "0.00312", None]) == ["0.0031", "0.00312", "—"]
    assert short_values(["0.001234", "0.0012341"]) == ["0.001234", "0.0012341"]
    assert short_values(["12", "adamw", "true"]) == ["12", "adamw", "true"]


def test_table_plot_and_legend_from_run_dirs(tmp_path):
    records = [
        {"step": 0, "val_loss": 5.0, "wall_seconds": 0.5},
        {"step": 2, "loss": 4.0, "tokens": 200, "wall_seconds": 1.0},
        {"step": 3, "val_loss": 4.5, "wall_seconds": 1.2},  # no tokens of its own: 300 by the rate so far
        {"step": 4, "loss": 3.9, "tokens": 400, "val_loss": 4.2, "wall_seconds": 1.5},
    ]
    a = make_run(
        tmp_path / "runs" / "a",
        ["optim.lr=0.0031622776601683794", "trainer.max_steps=4", "hydra.run.dir=x"],
        {"val_loss": 4.2, "steps": 4, "eval/hellaswag/acc": 0.25, "eval/hellaswag/acc_stderr": 0.01},
        records,
    )
    make_run(tmp_path / "runs" / "b", ["trainer.max_steps=4", "optim=adamw"], None, records[:3], {"optim": "adamw"})
    assert [e["tokens"] for e in read_run(a).evals] == [0, 300, 400]
    runs, md = compare([str(tmp_path / "runs" / "*")], tmp_path / "out")
    assert [r.name for r in runs] == ["a", "b"] and [r.status for r in runs] == ["done", "interrupted"]
    header = md.splitlines()[0].split("|")
    assert [h.strip() for h in header[1:-1]] == [
        "run", "status", "optim.lr", "optim", "val_loss", "eval/hellaswag/acc", "steps", "tokens_per_s", "wall_seconds"
    ]  # fmt: skip
    assert "| a   | done        | 0.00316  | muon  | 4.2      | 0.25" in md
    assert (
        "| b   | interrupted | 0.003    | adamw | 4.5      |" in md
    )  # not set: the composed value; no results: the last
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10000


def test_runs_found_below_dirs_and_bad_arguments(tmp_path, capsys):
    for name in ("1_lr=2", "0_lr=1", "10_lr=3"):
        make_run(tmp_path / "sweep" / name, [f"optim.lr={name[-1]}"])
    assert [p.name for p in find_runs([str(tmp_path)])] == ["0_lr=1", "1_lr=2", "10_lr=3"]  # job order
    assert main([str(tmp_path / "nothing*"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nothing*'}: matches nothing"
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'empty'}: no run dir there or below (a run dir holds .hydra/)"]


DAMAGED = [  # file of the run dir, its content, what the one error line says
    ("results.json", "[1, 2]", "results.json is a JSON list, not a JSON mapping"),
    ("results.json", "null", "results.json is a JSON null, not a JSON mapping"),
    ("results.json", '{"val_loss": 4', "results.json: not valid JSON"),
    (".hydra/overrides.yaml", "5", "overrides.yaml is a YAML int, not a YAML list"),
    (".hydra/hydra.yaml", "hydra: {runtime: x}", "hydra.yaml: runtime is a YAML str, not a YAML mapping"),
    (".hydra/config.yaml", b"\xff\x00", "config.yaml: unreadable ('utf-8' codec"),
]


def test_damaged_run_files_are_one_line_and_a_diverged_run_is_drawn(tmp_path, capsys):
    """A damaged results.json or .hydra file: one line naming it, exit 2; a NaN validation loss (a diverged run) and
    records with junk in their numbers are read, tabled and drawn without the junk."""
    for i, (name, content, says) in enumerate(DAMAGED):
        run = make_run(tmp_path / str(i), ["optim.lr=1"], {"val_loss": 4.0})
        (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        assert main([str(run), "--out", str(tmp_path / "o")]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {run / name}") and says in err[0], (name, err)
    diverged = [{"step": 0, "val_loss": 5.0, "tokens": True}, {"step": 2, "val_loss": float("nan"), "tokens": "x"}]
    a = make_run(tmp_path / "runs" / "a", ["optim.lr=1"], None, diverged)
    make_run(tmp_path / "runs" / "b", ["optim.lr=2"], None, [{"step": True, "val_loss": 1.0}] + diverged[:1])
    assert [e["tokens"] for e in read_run(a).evals] == [0, 0]
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert "| a   | interrupted | 1" in capsys.readouterr().out and (tmp_path / "out" / "compare.png").is_file()
