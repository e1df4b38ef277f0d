"""Errors a user can cause. Each message names the culprit; `run.py` prints it as one line and exits non-zero."""


class LLMError(Exception):
    """Base class of every user-facing error of the project."""


class ConfigError(LLMError):
    """A configuration value is invalid (wrong key, value out of range, incompatible options)."""


class DataError(LLMError):
    """Input data or a tokenizer cannot be used (missing file, malformed row, empty corpus)."""


class TrainingError(LLMError):
    """Training cannot go on (too many non-finite steps, a checkpoint that cannot be written)."""


def check_choice(key: str, value, allowed) -> None:
    """Raise ConfigError naming `key` when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {sorted(allowed)}")


def check_positive(key: str, value, allow_zero: bool = False) -> None:
    """Raise ConfigError naming `key` when `value` is not a positive (or non-negative) integer/number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        want = "a non-negative number" if allow_zero else "a positive number"
        raise ConfigError(f"{key}={value!r} must be {want}")
