"""Checkpoints without pickle: `checkpoints/step_NNNNNNN/` holds

- `model.safetensors`   the plain model's weights (tied weights stored once),
- `optimizer.safetensors` + `optimizer.json`   optimizer tensors and hyper-parameters,
- `trainer_state.json`  step, tokens seen, data position, RNG states, ... (everything the loop needs to go on),
- `model_config.json`   the GPTConfig to rebuild the model, and `tokenizer/` to encode the same way,
- `manifest.json`       size and sha256 of every file: written last, so its presence marks a complete checkpoint.

A checkpoint is written into `step_NNNNNNN.tmp/`, flushed, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
from loguru import logger
from safetensors.torch import load_file, load_model, save_file, save_model

from llm.errors import ConfigError, DataError
from llm.failures import about
from llm.model import OPTIONS_OFF, GPTConfig
from llm.model.moe import TRAINING_KEYS
from llm.model.rope import parse_scaling
from llm.utils.files import atomic_dir, fsync_dir, write_atomic

MANIFEST = "manifest.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimizer_to_flat(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict (or the optimizer's) into tensors (for safetensors) and JSON-able
    hyper-parameters."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]  # JSON lists
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | dict | None,
    trainer_state: dict,
    model_config: dict,
    tokenizer=None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write a complete checkpoint to `directory` atomically (tmp dir + rename). Returns its path.

    `model` is the plain module or anything with its full `state_dict()` (FSDP: gathered by
    llm.checkpoint.checkpointer.full_state); `optimizer` an optimizer or its full state dict (integer parameter ids);
    `extra`: more files by name and text (a LoRA run's `adapter.json`)."""
    directory = Path(directory)
    with atomic_dir(directory, fsync=True) as tmp:  # a failed save (e.g. ENOSPC) leaves the older checkpoints alone
        _write(tmp, model, optimizer, trainer_state, model_config, tokenizer, extra or {})
    return directory


def _write(tmp: Path, model, optimizer, trainer_state: dict, model_config: dict, tokenizer, extra: dict) -> None:
    save_model(model, str(tmp / "model.safetensors"))
    for name, text in extra.items():
        (tmp / name).write_text(text)
    if optimizer is not None:
        tensors, meta = optimizer_to_flat(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for path in files:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    fsync_dir(tmp)


def is_complete(directory: str | Path, verify: bool = True) -> bool:
    """True when the manifest exists and every file has its recorded size (and sha256 with verify)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    for name, info in manifest.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != info["size"]:
            return False
        if verify and _sha256(path) != info["sha256"]:
            return False
    return True


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run dir; incomplete or corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        if is_complete(path):
            return path
        logger.warning(f"checkpoint {path} is incomplete or corrupt; skipping it")
    return None


def finished_runs(task: str, roots=("outputs", "multirun_outputs")) -> list[tuple[Path, dict]]:
    """(run dir, results) of every finished run of `task` under `roots`, oldest first (by results.json time)."""
    found = []
    for root in roots:
        for results in Path(root).glob("**/results.json"):
            try:
                record = json.loads(results.read_text())
            except (OSError, ValueError):
                continue
            if record.get("task") == task:
                found.append((results.stat().st_mtime, results.parent, record))
    return [(run, record) for _, run, record in sorted(found, key=lambda f: f[0])]


def latest_run(selector: str, roots=("outputs", "multirun_outputs")) -> Path:
    """`latest:<task>`: the newest finished run of the task; `best:<task>`: its finished run with the lowest final
    val_loss. The choice is logged with what it is (path, steps, val_loss): a 10-step smoke test is easy to spot."""
    kind, task = selector.split(":", 1)
    runs = finished_runs(task, roots)
    if kind == "best":
        runs = [r for r in runs if isinstance(r[1].get("val_loss"), (int, float)) and math.isfinite(r[1]["val_loss"])]
        runs.sort(key=lambda r: -r[1]["val_loss"])  # the best last
    if not runs:
        raise ConfigError(f"{selector}: no finished {task} run under {list(roots)} (run that task first)")
    run, record = runs[-1]
    logger.warning(
        f"{selector} is {run}: {record.get('steps')} steps, val_loss {record.get('val_loss')} "
        f"({len(runs)} finished {task} run(s); best:{task} picks the lowest val_loss)"
    )
    return run


def resolve_checkpoint(path: str | Path, key: str) -> Path:
    """A checkpoint dir, a run dir (-> its newest complete checkpoint), `latest:<task>` (the newest finished run of
    that task under outputs/ and multirun_outputs/) or `best:<task>` (its lowest final val_loss). `key` names the
    option in errors."""
    if str(path).startswith(("latest:", "best:")):
        path = latest_run(str(path))
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise ConfigError(f"{key}={str(path)!r}: no such run or checkpoint directory")
    if (path / MANIFEST).exists():
        if not is_complete(path):
            raise ConfigError(f"{key}={str(path)!r}: checkpoint is incomplete or corrupt")
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise ConfigError(f"{key}={str(path)!r}: no complete checkpoint in it (looked in {path / 'checkpoints'})")
    return found


def load_model_weights(directory: str | Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights into `model`; one line naming the file when it is not safetensors or its tensors
    do not fit the model that model_config.json describes."""
    path = Path(directory) / "model.safetensors"
    with about(path):
        missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {directory}: weights do not match the model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )


def read_optimizer(directory: str | Path) -> dict:
    """A checkpoint's optimizer state dict (state under integer ids, param_groups as saved)."""
    directory = Path(directory)
    with about(directory / "optimizer.safetensors"):
        tensors = load_file(str(directory / "optimizer.safetensors"))
    return optimizer_from_flat(tensors, read_json(directory, "optimizer.json"))


def load_optimizer(directory: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Resume's: the checkpoint's optimizer state into `optimizer`; ConfigError in one line when it was saved by
    another optimizer layout (optim=adamw vs muon; under muon, optim.experts / optim.router of an MoE)."""
    state = read_optimizer(directory)
    problem = optimizer_mismatch(state, optimizer)
    if problem:
        raise ConfigError(
            f"resume: the optimizer state in {directory} has {problem}: resume with the optim settings it was "
            f"saved with (optim, and for an MoE optim.experts and optim.router), or start a new run from its weights "
            f"with init_from={directory}"
        )
    with about(Path(directory) / "optimizer.json"):
        optimizer.load_state_dict(state)


def optimizer_mismatch(saved: dict, optimizer) -> str | None:
    """Why a saved optimizer state dict does not fit `optimizer`: its parameter groups (name, number of parameters)
    differ, or a state tensor is shaped for another parameter; None when it fits."""
    theirs, ours = _layout(saved["param_groups"]), _layout(optimizer.param_groups)
    if theirs != ours:
        return f"parameter groups {theirs}, this run's {ours}"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    shaped = all(
        int(i) < len(params) and (not torch.is_tensor(v) or v.dim() == 0 or v.shape == params[int(i)].shape)
        for i, state in saved["state"].items()
        for v in state.values()
    )
    return None if shaped else "state shaped for another model"


def _layout(groups: list[dict]) -> list[tuple]:
    """(name, number of parameters) of each group."""
    return [(g.get("name"), len(g["params"])) for g in groups]


PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def read_json(directory: str | Path, name: str) -> dict:
    """A checkpoint's JSON file as a dict; ConfigError naming the dir when it lacks the file (not a checkpoint of
    ours: a PyTorch pickle is never loaded, as it can run code), DataError naming the file when it is not JSON."""
    directory = Path(directory)
    path = directory / name
    if not path.is_file():
        held = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        pickles = [n for n in held if n.endswith(PICKLES)]
        hint = (
            f"; {pickles[0]} is a PyTorch pickle, which is never loaded (it can run code): save its weights as "
            f"safetensors, e.g. as a Hugging Face model dir"
            if pickles
            else ""
        )
        raise ConfigError(f"{directory}: not a checkpoint of this project (no {name}; it holds {held[:6]}){hint}")
    with about(path):
        value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a JSON object")
    return value


def prune_checkpoints(run_dir: str | Path, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (called after a new one is complete)."""
    if not keep_last or keep_last < 1:  # never the newest (settings refuse keep_last < 1 before a run)
        return
    complete = [p for p in list_checkpoints(run_dir) if is_complete(p, verify=False)]
    for path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def write_last_pointer(run_dir: str | Path, checkpoint: Path) -> None:
    """`checkpoints/last` names the newest complete checkpoint (written atomically)."""
    write_atomic(Path(run_dir) / "checkpoints" / "last", checkpoint.name + "\n")


# Model-config keys that must match for weights to be loadable (init_from); resume compares every key.
ARCH_KEYS = (
    "vocab_size",
    "n_layer",
    "n_head",
    "n_kv_head",
    "d_model",
    "ffn_hidden",
    "pos_emb",
    "norm",
    "mlp",
    "bias",
    "pad_vocab_to",
    "tie_embeddings",
    "head_dim",
    *OPTIONS_OFF,  # q/k/v biases, QK-norm, sliding windows, Gemma's options
)
# keys added after older checkpoints were written, at the value those checkpoints were trained with: the options'
# off values, and the tied head (GPTConfig's default)
DEFAULTS = {**OPTIONS_OFF, "tie_embeddings": GPTConfig.__dataclass_fields__["tie_embeddings"].default}


def check_compatible(saved: dict, now: dict, key: str, path, strict: bool = False) -> None:
    """Raise ConfigError naming every differing model key (checkpoint value vs configured value)."""
    saved, now = {**DEFAULTS, **saved}, dict(now)
    if saved.get("head_dim") is None and saved.get("d_model") and saved.get("n_head"):
        saved["head_dim"] = saved["d_model"] // saved["n_head"]  # a checkpoint from before head_dim was a key
    for side in (saved, now):  # compared parsed: checkpoints written before GPTConfig kept the parsed form
        if side.get("rope_scaling") is not None:
            side["rope_scaling"] = parse_scaling(side["rope_scaling"])
        if side.get("moe") and not strict:  # init_from may train the experts with other coefficients
            side["moe"] = {k: v for k, v in side["moe"].items() if k not in TRAINING_KEYS}
    keys = list(now) if strict else list(ARCH_KEYS)
    if not strict and now.get("pos_emb") == "learned":
        keys.append("max_seq_len")  # the learned position table has that many rows
    diff = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"{key}={str(path)!r}: incompatible model ({shown})")
