"""Where a run started from, for results.json: an anneal branch (`experiment=anneal`) or a fine-tune names the
checkpoint its weights came from and that checkpoint's step, so one long run's branches can be told apart."""

from __future__ import annotations

import json
from pathlib import Path


def branch_origin(init_from: str | None) -> dict:
    """{"init_from": dir, "init_from_step": step, "init_from_val_loss": its last validation loss} for a checkpoint
    of ours; {"init_from": dir} for another model dir; {} without init_from."""
    if not init_from:
        return {}
    path = Path(init_from)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):  # a Hugging Face model dir, or a checkpoint without a readable state
        return {"init_from": str(path)}
    return {
        "init_from": str(path),
        "init_from_step": state.get("step"),
        "init_from_val_loss": state.get("last_val_loss"),
    }
