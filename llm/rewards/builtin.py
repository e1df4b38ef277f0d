"""The built-in rewards. Each takes the prompts (the user's text), the completions (the model's replies, decoded,
without the stop token) and the rows they came from (each with `answer`, the value of task.data.answer_field),
and returns one float per completion. Keyword arguments come from the reward's entry in `task.rewards`."""

from __future__ import annotations

import math
import re

NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def exact_match(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 where the reply equals the answer (whitespace at the ends trimmed), else 0.0."""
    return [float(c.strip() == str(r["answer"]).strip()) for c, r in zip(completions, rows)]


def _first_number(text: str) -> float | None:
    match = NUMBER.search(text.replace(",", ""))
    return float(match.group()) if match else None


def numeric_match(
    prompts: list[str], completions: list[str], rows: list[dict], tolerance: float = 0.0, relative: bool = False
) -> list[float]:
    """1.0 where the first number in the reply is within `tolerance` of the answer (a number): |x - a| <= tolerance,
    or <= tolerance * |a| with relative=true; 0.0 otherwise, and for a reply without a number."""
    out = []
    for c, r in zip(completions, rows):
        got, want = _first_number(c), _first_number(str(r["answer"]))
        if got is None or want is None or not math.isfinite(got):
            out.append(0.0)
            continue
        limit = tolerance * abs(want) if relative else tolerance
        out.append(float(abs(got - want) <= limit))
    return out


def format_check(
    prompts: list[str],
    completions: list[str],
    rows: list[dict],
    pattern: str | None = None,
    min_chars: int = 1,
    max_chars: int | None = None,
) -> list[float]:
    """1.0 where the reply (trimmed) fully matches the regular expression `pattern` (when given) and has between
    `min_chars` and `max_chars` characters (no upper limit when null), else 0.0: rewards the shape of an answer."""
    regex = re.compile(pattern) if pattern is not None else None
    out = []
    for c in completions:
        text = c.strip()
        ok = len(text) >= min_chars and (max_chars is None or len(text) <= max_chars)
        out.append(float(ok and (regex is None or regex.fullmatch(text) is not None)))
    return out
