"""The learning-rate schedule at its edges: warmup, the stable phase of wsd, the first and last decay steps, both
decay shapes, and the older schedules unchanged."""

from __future__ import annotations

import math

import pytest

from llm.errors import ConfigError
from llm.train.optim import OptimizerConfig
from llm.train.schedule import lr_factor


def test_wsd_edges_linear():
    f = lambda s: lr_factor(s, 100, warmup_steps=10, schedule="wsd", decay_fraction=0.2)  # noqa: E731
    assert [f(0), f(4), f(9)] == [pytest.approx(0.1), pytest.approx(0.5), 1.0]  # warmup ends at the peak
    assert f(10) == f(50) == f(79) == 1.0  # stable until the last 20 steps
    assert f(80) == pytest.approx(1 - 1 / 20)  # the first decay step already decays
    assert f(89) == pytest.approx(0.5)
    assert f(99) == 0.0  # the last step reaches the floor
    assert f(150) == 0.0  # past max_steps: stays there


def test_wsd_1_sqrt_and_floor():
    f = lambda s: lr_factor(  # noqa: E731
        s, 100, schedule="wsd", decay_fraction=0.5, decay_shape="1-sqrt", min_lr_ratio=0.1
    )
    assert f(0) == f(49) == 1.0
    assert f(50) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(1 / 50)))
    assert f(74) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert f(99) == pytest.approx(0.1)
    assert lr_factor(99, 100, schedule="wsd", decay_fraction=0.0) == 1.0  # no decay: constant after warmup
    assert lr_factor(0, 10, schedule="wsd", decay_fraction=1.0) == pytest.approx(0.9)  # all decay (an anneal)


def test_older_schedules_unchanged():
    opt = OptimizerConfig(lr=2.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert opt.lr_at(0, 110) == pytest.approx(0.2) and opt.lr_at(10, 110) == pytest.approx(2.0)
    assert opt.lr_at(60, 110) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5)) and opt.lr_at(110, 110) == pytest.approx(0.2)
    linear = OptimizerConfig(lr=2.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert linear.lr_at(5, 10) == pytest.approx(1.0)
    assert OptimizerConfig(lr=2.0, schedule="constant", warmup_steps=2).lr_at(7, 10) == 2.0


@pytest.mark.parametrize(("key", "value"), [("decay_fraction", 1.5), ("decay_shape", "cosine"), ("schedule", "wsd2")])
def test_bad_schedule_keys_are_named(key, value):
    with pytest.raises(ConfigError, match=f"optim.{key}"):
        OptimizerConfig(**{key: value})
