"""Where a run started from, for results.json: an anneal branch (`experiment=anneal`) or a fine-tune names the
checkpoint its weights came from and that checkpoint's step, so one long run's branches can be told apart. And
`optim.init_state=checkpoint`: a branch's optimizer continues the checkpoint's state."""

from __future__ import annotations

import json
from pathlib import Path

from llm.checkpoint.files import optimizer_mismatch, read_optimizer
from llm.dist.parallel import is_fsdp
from llm.errors import ConfigError


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


def continue_optimizer(init_from: str | None, model, optimizer) -> None:
    """optim.init_state=checkpoint: the optimizer starts from the state saved in init_from's checkpoint (AdamW's
    moments and step count, Muon's momentum) instead of afresh, as OLMo-core's anneals continue theirs; the
    hyper-parameters (lr, betas, weight decay, momentum, ...) stay this run's. ConfigError in one line when the
    checkpoint holds no optimizer state, or its parameter groups (names, sizes, shapes) are not this optimizer's."""
    if not init_from:
        raise ConfigError("optim.init_state=checkpoint takes init_from's optimizer state: set init_from=<checkpoint>")
    path = Path(init_from)
    if not (path / "optimizer.safetensors").is_file():
        raise ConfigError(
            f"optim.init_state=checkpoint: init_from={path} holds no optimizer state (optimizer.safetensors): give "
            f"a training checkpoint of ours, or use optim.init_state=fresh"
        )
    if is_fsdp(model):
        raise ConfigError("optim.init_state=checkpoint is not built for trainer.strategy=fsdp: use ddp or single")
    saved = read_optimizer(path)
    what = optimizer_mismatch(saved, optimizer)
    if what:
        raise ConfigError(
            f"optim.init_state=checkpoint: the optimizer state in {path} has {what}: the branch needs the optim and "
            f"model of the run that saved it, or optim.init_state=fresh"
        )
    own = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, hyper in zip(optimizer.param_groups, own):  # the loaded groups carry the saved run's values
        group.update(hyper)
