"""The finished runs a fit reads: every results.json under a directory (a run dir, a sweep dir, a ladder dir), as
(name, params, tokens, val_loss). An anneal branch (results.json names `init_from` and `init_from_step`) counts the
tokens of the checkpoint it started from as well: its model has seen both."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llm.errors import ConfigError


@dataclass
class Run:
    name: str  # the run dir, relative to the directory read
    params: int
    tokens: int
    val_loss: float


def _checkpoint_tokens(init_from: str) -> int:
    """Tokens the checkpoint `init_from` had trained on (its trainer_state.json), 0 when it has none."""
    try:
        state = json.loads((Path(init_from) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(state.get("tokens_seen") or 0)


def collect(root: str | Path) -> list[Run]:
    """Every finished pretraining run under `root` with params, tokens and a finite val_loss, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not a directory of run dirs")
    runs = []
    for path in sorted(root.rglob("results.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not readable JSON ({e})") from None
        if res.get("task") != "pretrain" or not all(
            isinstance(res.get(k), (int, float)) for k in ("params", "tokens", "val_loss")
        ):
            continue
        tokens = int(res["tokens"]) + (_checkpoint_tokens(res["init_from"]) if res.get("init_from_step") else 0)
        name = str(path.parent.relative_to(root)) if path.parent != root else path.parent.name
        runs.append(Run(name, int(res["params"]), tokens, float(res["val_loss"])))
    return runs
