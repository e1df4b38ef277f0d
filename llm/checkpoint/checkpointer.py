"""A run's checkpoints as the training loop sees them: `Checkpointer` saves (every N steps, at a stop and at the
end), restores (resume), prunes to `keep_last` and keeps the `checkpoints/last` pointer. Under FSDP the full
state is gathered to rank 0 for saving and set back from the full files on every rank, so a checkpoint has the
same files as a one-process run and resumes on any number of ranks. The file format is `llm.checkpoint.files`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from loguru import logger
from safetensors.torch import load_file

from llm.checkpoint import adapters
from llm.checkpoint import files as ckpt
from llm.dist.parallel import is_fsdp, rank0_succeeded
from llm.errors import ConfigError, TrainingError
from llm.failures import about, os_problem
from llm.peft import has_lora


class Checkpointer:
    """Owns `<run_dir>/checkpoints/`. Every rank calls `save` and `restore` (FSDP gathers and scatters); only rank
    0 writes. The tokenizer is saved in each checkpoint so that token ids keep their meaning."""

    def __init__(self, run_dir: str | Path, tokenizer=None, keep_last: int | None = None, is_main: bool = True):
        self.run_dir, self.tokenizer, self.keep_last, self.is_main = Path(run_dir), tokenizer, keep_last, is_main
        self.last: Path | None = None  # the newest checkpoint this process wrote (rank 0)

    def save(self, step: int, model: torch.nn.Module, optimizer, trainer_state: dict) -> Path | None:
        """Write `checkpoints/step_NNNNNNN/` (atomically), point `last` at it, prune. Returns its path on rank 0."""
        model_state, optim_state = full_state(model, optimizer)  # fsdp: all ranks gather
        if has_lora(model) and model_state is not None:  # LoRA: the adapters only (their optimizer state is all)
            model_state = StateDictModule(adapters.saved_tensors(model, model_state.state_dict()))
        path, error = None, None
        if self.is_main:
            try:
                path = self._write(step, model, model_state, optim_state, trainer_state)
            except Exception as e:  # raised below, once every rank knows
                error = e
        # every rank waits for rank 0's write and learns how it went: a failure there stops them all at once
        # instead of leaving them at a barrier until the collective times out
        if not rank0_succeeded(error is None):
            raise error or TrainingError(f"step {step}: rank 0 could not write the checkpoint (its log says why)")
        return path

    def _write(self, step: int, model, model_state, optim_state, trainer_state: dict) -> Path:
        if not all(bool(torch.isfinite(t).all()) for t in model_state.state_dict().values()):
            raise TrainingError(f"step {step}: the weights are not finite; no checkpoint written")
        path = self.run_dir / "checkpoints" / ckpt.step_dir_name(step)
        try:
            extra = {adapters.ADAPTER_FILE: adapters.adapter_json(model)} if has_lora(model) else None
            ckpt.save_checkpoint(
                path, model_state, optim_state, trainer_state, model.config.to_dict(), self.tokenizer, extra
            )
            ckpt.write_last_pointer(self.run_dir, path)
        except Exception as e:  # a full disk, a quota, a file-size limit (OSError, or safetensors' own error
            problem = os_problem(e, file=False)  # carrying the errno): the older checkpoints and `last` stay
            if problem is None:
                raise
            previous = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingError(
                f"checkpoint {path} could not be written ({problem}); the newest complete checkpoint is "
                f"{previous or 'none'}"
            ) from e
        ckpt.prune_checkpoints(self.run_dir, self.keep_last)
        logger.info(f"checkpoint: {path}")
        self.last = path
        return path

    def restore(self, resume: str, model: torch.nn.Module, optimizer, fingerprint: dict | None = None) -> dict | None:
        """Load the checkpoint `resume` names (`auto`: this run dir's newest complete one) into the model and
        optimizer (None: weights only). Returns its trainer state, or None when `auto` finds no checkpoint.
        `fingerprint`: the settings an exact continuation needs (seed, data, ...); a checkpoint saved with other
        values is refused before anything is loaded."""
        path = ckpt.latest_checkpoint(self.run_dir) if resume == "auto" else ckpt.resolve_checkpoint(resume, "resume")
        if path is None and ckpt.list_checkpoints(self.run_dir):  # never start over on its own: that is overwrite's
            names = ", ".join(p.name for p in ckpt.list_checkpoints(self.run_dir))
            raise ConfigError(
                f"resume=auto: no usable checkpoint in {self.run_dir / 'checkpoints'} ({names}: incomplete or "
                f"corrupt); nothing was changed. Resume from another one with resume=<checkpoint dir>, or start the "
                f"run over with overwrite=true (without resume)"
            )
        if path is None:
            logger.info(f"resume=auto: no checkpoint in {self.run_dir}; starting from scratch")
            return None
        ckpt.check_compatible(
            ckpt.read_json(path, "model_config.json"), model.config.to_dict(), "resume", path, strict=True
        )
        state = ckpt.read_json(path, "trainer_state.json")
        check_same_run(state.get("fingerprint"), fingerprint, resume, path)
        if has_lora(model) or adapters.is_adapter_checkpoint(path):
            if not has_lora(model):
                raise ConfigError(f"resume={resume}: {path} holds LoRA adapters; resume it with peft=lora")
            adapters.check_base(path, model, "resume")
        load_state(path, model, optimizer)  # every rank: the same full checkpoint
        logger.info(f"resumed from {path} at step {state.get('step')}")
        return state


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_run(saved: dict | None, now: dict | None, resume: str, path) -> None:
    """ConfigError naming every setting that differs between a checkpoint and the run resuming it (checkpoints
    from before fingerprints: nothing to compare)."""
    if not saved or not now:
        return
    saved, now = _flat(saved), _flat(now)
    diff = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if diff:
        raise ConfigError(
            f"resume={resume}: {path} was trained with other settings ({'; '.join(diff[:3])}"
            f"{'; ...' if len(diff) > 3 else ''}); resuming would not continue it exactly. Use its "
            f"settings, or start a new run from its weights with init_from={path}"
        )


# ---------------------------------------------------------------------------------------------- full state (FSDP)
def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every optimizer parameter, in the order of optimizer.state_dict()'s integer ids."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class StateDictModule:
    """A gathered state dict where safetensors' save_model expects a module (it only calls state_dict())."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """What llm.checkpoint.files.save_checkpoint writes, on every rank (FSDP gathers, so all ranks call this).

    single / ddp: the plain module and the optimizer themselves (rank 0's replica is complete).
    fsdp: full state dicts gathered to rank 0 on the CPU (empty on the other ranks), keyed like the plain model's
    (tied weights share one tensor, optimizer state under integer ids) — the same files as a one-process run, so a
    checkpoint resumes on any number of ranks."""
    if not is_fsdp(model):
        return model, optimizer
    # imported here, as FSDP itself is (llm.dist.parallel.is_fsdp): it costs every other run's start ~0.7 s
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, optimizer, options=options)
    if not msd:  # ranks > 0
        return None, None
    for names in _tied_groups(model):
        for name in names[1:]:
            msd[name] = msd[names[0]]
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    state = {index[fqn]: value for fqn, value in osd["state"].items() if fqn in index}
    groups = [{**g, "params": [index[fqn] for fqn in g["params"] if fqn in index]} for g in osd["param_groups"]]
    return StateDictModule(msd), {"state": state, "param_groups": groups}


def load_state(directory, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a (full) checkpoint into the model and optimizer on this rank; every rank reads the same files."""
    lora = has_lora(model)
    if not is_fsdp(model):
        adapters.load_adapters(directory, model) if lora else ckpt.load_model_weights(directory, model)
        if optimizer is not None:
            ckpt.load_optimizer(directory, optimizer)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    directory = Path(directory)
    options = StateDictOptions(full_state_dict=True, strict=not lora)
    with about(directory / "model.safetensors"):
        msd = adapters.load_saved(directory, model) if lora else load_file(str(directory / "model.safetensors"))
    for names in _tied_groups(model):  # stored once
        present = [n for n in names if n in msd]
        if not present:
            continue
        for name in names:
            msd.setdefault(name, msd[present[0]])
    expected = set(model.state_dict())
    if not lora and set(msd) != expected:
        raise ConfigError(
            f"checkpoint {directory}: weights do not match the model (missing "
            f"{sorted(expected - set(msd))[:5]}, unexpected {sorted(set(msd) - expected)[:5]})"
        )
    set_model_state_dict(model, msd, options=options)
    if optimizer is None:
        return
    with about(directory / "optimizer.safetensors"):
        tensors = load_file(str(directory / "optimizer.safetensors"))
    flat = ckpt.optimizer_from_flat(tensors, ckpt.read_json(directory, "optimizer.json"))
    names = _param_names(model, optimizer)
    osd = {
        "state": {names[int(i)]: v for i, v in flat["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in flat["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, osd, options=options)
