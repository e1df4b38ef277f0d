"""Loading the rewards named in `task.rewards` and scoring completions with them.

`load_rewards` turns the config's entries ({_target_: dotted.path, weight: 1.0, name: ..., **kwargs}) into
`Reward`s, importing each function; `score` calls each on a batch and checks what it returned: one finite number
per completion, else a one-line error naming the function and the row.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
from collections.abc import Callable

from llm.errors import ConfigError, DataError


class RewardError(DataError):
    """A reward function returned something that is not one finite number per completion."""


class Reward:
    """One loaded reward: `name` (in the metrics: rewards/<name>/mean), `fn(prompts, completions, rows)`, its
    `weight` in the total, and `target`, the dotted path it came from (for errors). A plain class, not a
    dataclass: Hydra's instantiate passes it through as it is."""

    def __init__(self, name: str, fn: Callable, weight: float = 1.0, target: str = ""):
        self.name, self.fn, self.weight, self.target = name, fn, weight, target or name

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, {self.target}, weight={self.weight})"


def _import(path: str, key: str) -> Callable:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}={path!r} must be a dotted path module.function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}={path!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}={path!r}: module {module_name!r} has no function {attr!r}")
    return fn


def load_rewards(specs, key: str = "task.rewards") -> list[Reward]:
    """Rewards from their config entries: `_target_` (required), `weight` (a finite number, default 1.0), `name`
    (default: the function's name, made unique), and any other keys as keyword arguments of the function."""
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ConfigError(f"{key} must be a non-empty list of {{_target_: module.function, weight: ...}} entries")
    rewards, names = [], set()
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("_target_"), str):
            raise ConfigError(f"{where} must be a mapping with _target_: module.function (got {spec!r})")
        kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "weight", "name")}
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ConfigError(f"{where}.weight={weight!r} must be a finite number")
        fn = _import(spec["_target_"], f"{where}._target_")
        name = str(spec.get("name") or spec["_target_"].rpartition(".")[2])
        base, n = name, 2
        while name in names:  # the same function twice (e.g. two tolerances): exact_match, exact_match_2
            name, n = f"{base}_{n}", n + 1
        names.add(name)
        rewards.append(Reward(name, functools.partial(fn, **kwargs) if kwargs else fn, float(weight), spec["_target_"]))
    return rewards


def _checked(reward: Reward, values, where: list[str]) -> list[float]:
    n = len(where)
    if hasattr(values, "tolist"):  # a NumPy array or a tensor
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(
            f"reward {reward.name} ({reward.target}) returned {type(values).__name__}, not a list of {n} numbers"
        )
    if len(values) != n:
        raise RewardError(f"reward {reward.name} ({reward.target}) returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise RewardError(
                f"reward {reward.name} ({reward.target}): row {i} ({where[i]}): returned {v!r}, not a finite number"
            )
        out.append(float(v))
    return out


def score(
    rewards: list[Reward], prompts: list[str], completions: list[str], rows: list[dict], where: list[str]
) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per completion, each reward's own values). `where` names each completion's row in errors."""
    each = {}
    for r in rewards:
        try:
            values = r.fn(prompts, completions, rows)
        except Exception as e:  # the user's function failed: name it, not a traceback from inside the trainer
            raise RewardError(f"reward {r.name} ({r.target}) raised {type(e).__name__}: {e}") from e
        each[r.name] = _checked(r, values, where)
    totals = [sum(r.weight * each[r.name][i] for r in rewards) for i in range(len(completions))]
    return totals, each
