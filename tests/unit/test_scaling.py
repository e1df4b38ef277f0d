"""The scaling ladder's pieces: the L(N, D) fit recovers known constants, the runs it reads (an anneal branch counts
its checkpoint's tokens), the ladder's formulas and commands, and a preset's parameters for a prediction."""

from __future__ import annotations

import json
import math

import pytest

from llm.errors import ConfigError
from llm.scaling.fit import Law, fit_law
from llm.scaling.ladder import commands, plan
from llm.scaling.report import parse_predict
from llm.scaling.runs import collect

TRUE = Law(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)  # Chinchilla's order of magnitude


def test_fit_recovers_known_constants():
    """Noise-free L(N, D) on a 5 x 4 grid (N 1e5..1e7, D 1e6..3e7), from 16 starting points none of which is the
    truth: every constant within 1% (measured: 1e-5)."""
    points = [(n, d) for n in (1e5, 3e5, 1e6, 3e6, 1e7) for d in (1e6, 3e6, 1e7, 3e7)]
    grid = {"a": [5.0, 15.0], "b": [5.0, 15.0], "e": [0.5], "alpha": [0.2, 0.6], "beta": [0.2, 0.6]}
    law = fit_law([n for n, _ in points], [d for _, d in points], [TRUE.predict(n, d) for n, d in points], grid=grid)
    for key in ("E", "A", "alpha", "B", "beta"):
        assert getattr(law, key) == pytest.approx(getattr(TRUE, key), rel=0.01), key
    with pytest.raises(ConfigError, match="at least 5 runs"):
        fit_law([1e5] * 4, [1e6] * 4, [3.0] * 4)


def test_collect_reads_runs_and_counts_a_branch_checkpoints_tokens(tmp_path):
    main, branch, other = tmp_path / "w64" / "main", tmp_path / "w64" / "budget_0.5", tmp_path / "sft"
    ckpt = main / "checkpoints" / "step_0000040"
    for d in (ckpt, branch, other):
        d.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 40, "tokens_seen": 20480}))
    (main / "results.json").write_text(
        json.dumps({"task": "pretrain", "params": 1000, "tokens": 51200, "val_loss": 3.0})
    )
    (branch / "results.json").write_text(
        json.dumps(
            {
                "task": "pretrain",
                "params": 1000,
                "tokens": 5120,
                "val_loss": 3.2,
                "init_from": str(ckpt),
                "init_from_step": 40,
            }
        )
    )
    (other / "results.json").write_text(json.dumps({"task": "sft", "params": 1000, "tokens": 10, "val_loss": 1.0}))
    runs = {r.name: r for r in collect(tmp_path)}
    assert set(runs) == {"w64/main", "w64/budget_0.5"}
    assert runs["w64/budget_0.5"].tokens == 20480 + 5120 and runs["w64/main"].tokens == 51200


def test_ladder_formulas_and_branch_points(tmp_path):
    """Batch grows as sqrt(N) in powers of 2, steps cover tokens_per_param x N in multiples of 20, one lr (µP), and
    each smaller budget's branch starts from a checkpoint the main run writes."""
    rungs = plan([64, 128], tokens_per_param=2.0, batch0=8, lr0=0.01)
    small, big = rungs
    assert big.params > 2 * small.params and small.batch_size == 8
    assert big.batch_size == 2 ** round(math.log2(8 * math.sqrt(big.params / small.params)))
    for r in rungs:
        assert r.steps % 20 == 0 and r.steps * r.batch_size * 64 >= 2.0 * r.params and r.lr == 0.01
    cmds = commands(rungs, tmp_path, fractions=(0.25, 0.5))
    assert len(cmds) == 6 and "model.base_width=64" in cmds[3]
    branch = cmds[1]
    start = int(next(a for a in branch if a.startswith("init_from=")).rsplit("_", 1)[1])
    assert start % small.save_every == 0 and f"trainer.max_steps={small.steps // 4 - start}" in branch


def test_predict_names_a_preset_or_a_count():
    name, n, d = parse_predict("125m:2.5e9", 50304)
    assert name == "125m" and 120e6 < n < 130e6 and d == 2.5e9
    assert parse_predict("3e6:1e8", 4096)[1:] == (3_000_000, 1e8)
    with pytest.raises(ConfigError, match="neither a parameter count nor a model preset"):
        parse_predict("huge:1e9", 4096)
    with pytest.raises(ConfigError, match="expected NAME:TOKENS"):
        parse_predict("125m", 4096)
