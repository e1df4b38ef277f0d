"""Errors a user can cause, and the checks that raise them. Each message names the culprit (the key, its value and
what is allowed); `run.py` prints it as one line and exits non-zero.

The checks are the one vocabulary of validation: `check_int` (counts: no 2.5, no bool), `check_number` (finite,
within bounds), `check_bool`, `check_choice`, `check_seed`; each returns the value it passed.
"""

import math


class LLMError(Exception):
    """Base class of every user-facing error of the project."""


class ConfigError(LLMError):
    """A configuration value is invalid (wrong key, value out of range, incompatible options)."""


class DataError(LLMError):
    """Input data or a tokenizer cannot be used (missing file, malformed row, empty corpus)."""


class TrainingError(LLMError):
    """Training cannot go on (too many non-finite steps, a checkpoint that cannot be written)."""


class ResourceError(LLMError):
    """The machine refused: a full disk or quota, a file-size limit, a name too long, a read-only or unwritable
    place, not enough memory. Not a bug and not bad input: one line saying what and where (`llm.failures`)."""


def check_choice(key: str, value, allowed) -> None:
    """Raise ConfigError naming `key` when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {sorted(allowed)}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    low, high = (f"{b:g}" if isinstance(b, float) else b for b in (low, high))
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"{'<' if high_open else '<='} {high}" if high is not None else ""


def check_int(key: str, value, low: int | None = None, high: int | None = None, allow_none: bool = False):
    """`value` when it is an integer (not a bool, not 2.5, not a string) within [low, high], else ConfigError naming
    `key`, the value and what is allowed. `allow_none`: None passes (a default to be derived)."""
    if value is None and allow_none:
        return value
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        what = f"an integer {_bounds(low, high, False, False)}".rstrip()
        raise ConfigError(f"{key}={value!r} must be {what}" + (" (or null)" if allow_none else ""))
    return value


def check_number(
    key: str,
    value,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
):
    """`value` when it is a finite number (NaN and Inf never pass) within the bounds (`*_open`: the bound itself is
    excluded), else ConfigError naming `key`, the value and what is allowed."""
    if value is None and allow_none:
        return value
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        what = f"a finite number {_bounds(low, high, low_open, high_open)}".rstrip()
        raise ConfigError(f"{key}={value!r} must be {what}" + (" (or null)" if allow_none else ""))
    return value


def check_bool(key: str, value) -> bool:
    """`value` when it is true or false, else ConfigError naming `key`."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def check_positive(key: str, value, allow_zero: bool = False) -> None:
    """Raise ConfigError naming `key` when `value` is not a finite positive (or non-negative) number."""
    ok = _is_number(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        want = "a non-negative number" if allow_zero else "a positive number"
        raise ConfigError(f"{key}={value!r} must be {want}")


SEED_MAX = 2**32 - 1  # NumPy's seed range is [0, 2**32 - 1]


def check_seed(key: str, value) -> int:
    return check_int(key, value, 0, SEED_MAX)
