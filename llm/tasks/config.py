"""From a composed config to plain objects: `build` (one `_target_`, logged, with a user's mistakes as one-line
errors) and `validate` (every key checked before any work); what a task's entry is told about its job
(`JobInfo`); the overrides a run was started with."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.utils import instantiate
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm.dist.signals import StopSignals
from llm.errors import ConfigError, LLMError, check_int, check_number, check_seed
from llm.failures import explain, too_big_model
from llm.model import gpt_config
from llm.rundir.writable import check_writable_dir


@dataclass
class JobInfo:
    """What a task's entry (`task.entry`, called as `entry(cfg, job)`) is told about its Hydra job."""

    run_dir: Path
    overrides: list[str]  # the command line's overrides of this job
    hydra: DictConfig  # the job's Hydra config (a sweep's settings: an Optuna trial finds its study there)
    stop: StopSignals  # caught for the whole job; `stop.check(where)` before long steps

    @property
    def explicit(self) -> set[str]:
        """The keys set on the command line."""
        return {o.split("=")[0].lstrip("+~") for o in self.overrides}

    @property
    def rescaled(self) -> bool:
        """Whether the command line sets the RoPE scaling (extrapolation=... or one of its keys)."""
        return any(k.split(".")[0] == "extrapolation" for k in self.explicit)


def build(node: DictConfig, what: str, **kwargs):
    """instantiate() one `_target_`, logging it; errors a user caused come out as our own one-line errors."""
    logger.info(f"instantiating {what}: {node._target_}")
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, LLMError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        known = too_big_model(e.__cause__ or e, {**node, **kwargs}) if what == "model" else explain(e.__cause__ or e)
        if known is not None:  # a library's or the machine's error (llm.failures): one line naming what
            raise known from e
        if isinstance(e.__cause__, TypeError) or isinstance(e, OmegaConfBaseException):
            raise ConfigError(f"{what} ({node._target_}): {str(e.__cause__ or e).splitlines()[0]}") from e
        raise


# Keys of the data, tokenizer and post-training groups that count something (the least value allowed; null passes:
# a default derived later), and the fractions: checked in every group before any work, with the rest of `validate`.
COUNT_KEYS = {
    "max_bytes": 1,
    "max_documents": 1,
    "num_examples": 1,
    "eval_samples": 0,
    "num_proc": 1,
    "min_frequency": 1,
    "max_train_bytes": 1,
    "offset": 0,
    "split_seed": 0,
    "seq_len": 1,
    "windows": 1,
    "passkey_trials": 1,
    "batch_size": 1,
    "shard_tokens": 1,
    "max_tokens": 1,
    "epochs": 1,
}
FRACTION_KEYS = ("val_fraction",)


def _check_tree(prefix: str, node) -> None:
    """Walk a plain config subtree: no NaN or Inf anywhere; counts are integers, fractions in [0, 1)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if isinstance(key, str) else f"{prefix}[{key}]"
        if isinstance(value, (dict, list)):
            _check_tree(name, value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} must be a finite number")
        elif key in COUNT_KEYS:
            check_seed(name, value) if key.endswith("seed") else check_int(
                name, value, COUNT_KEYS[key], allow_none=True
            )
        elif key in FRACTION_KEYS:
            check_number(name, value, 0, 1, high_open=True)


def validate(cfg: DictConfig) -> dict:
    """Every key checked before any work (no tokenizer trained, no data read, no model allocated): the seed, the
    trainer settings, the optimizer, the objective, the loggers, the model and extrapolation keys (a GPTConfig,
    no weights), and the counts and fractions of the data groups. Returns the cheap objects built on the way
    (`settings`, `optim`, `objective`, `loggers`); raises ConfigError naming the first bad key."""
    check_seed("seed", cfg.seed)
    if not isinstance(cfg.get("overwrite", False), bool):
        raise ConfigError(f"overwrite={cfg.overwrite!r} must be true or false")
    plain = OmegaConf.to_container(cfg, resolve=True)
    # the groups whose keys the data groups interpolate (task.data.seq_len: ${trainer.seq_len}) come first, so an
    # error names the key the user typed
    built = {
        "settings": build(cfg.trainer, "trainer"),
        "optim": build(cfg.optim, "optimizer"),
        "objective": build(cfg.task.objective, "objective"),
    }
    if built["optim"].init_state == "checkpoint" and not cfg.get("init_from"):
        raise ConfigError("optim.init_state=checkpoint takes init_from's optimizer state: set init_from=<checkpoint>")
    built["loggers"] = [build(node, f"logger {name}") for name, node in (cfg.get("logger") or {}).items() if node]
    built["peft"] = build(cfg.peft, "peft") if cfg.get("peft") else None  # LoRA's settings, checked
    built["evals"] = build(cfg.evals, "evals") if cfg.get("evals") else None  # downstream tasks: items read, checked
    if built["evals"] is not None:
        built["evals"].check_strategy(built["settings"].hardware.strategy)
    model_keys = {k: v for k, v in plain["model"].items() if k != "_target_"}
    model = gpt_config(**{"vocab_size": 1, **model_keys, "rope_scaling": plain.get("extrapolation")})
    built["rope_scaling"] = model.rope_scaling  # parsed here, once: the model is built with this form
    for group in ("data", "tokenizer", "post_data"):
        _check_tree(group, plain.get(group) or {})
    _check_tree("task.data", plain["task"].get("data") or {})
    check_cache_dirs(plain)
    return built


def check_cache_dir(key: str, value, hint: str = "") -> bool:
    """A cache dir this run can use: True when it can be written; False (logged) when it exists but cannot be
    written (a read-only shared cache: its complete entries are used as they are). ConfigError naming `key`
    when it is a file, lies under a file, or does not exist and cannot be made."""
    path = Path(os.path.expanduser(str(value))).absolute()
    try:
        check_writable_dir(key, value, hint=hint)
        return True
    except ConfigError:
        if not path.is_dir():
            raise
    logger.info(f"{key}={value} cannot be written: its complete entries are used as they are (read-only)")
    return False


def check_cache_dirs(plain: dict) -> None:
    """The cache dirs this run uses (the BPE's unless init_from brings a tokenizer, the token cache's) are
    directories: else one line naming the key (`cache_dir` when the group takes the top-level one). One that exists
    but cannot be written (a read-only shared cache) is read as it is; only an entry it lacks is an error."""
    used = {"task.data.cache_dir": (plain["task"].get("data") or {}).get("cache_dir")}
    if not plain.get("init_from"):
        used["tokenizer.cache_dir"] = (plain.get("tokenizer") or {}).get("cache_dir")
    for path, key in {v: k for k, v in reversed(used.items()) if v is not None}.items():  # each dir once
        check_cache_dir("cache_dir" if path == plain.get("cache_dir") else key, path, hint=" (or LLM_CACHE_DIR)")


def read_overrides(run_dir: Path) -> list[str]:
    """The command line's overrides of a run, as Hydra recorded them in `<run dir>/.hydra/overrides.yaml`."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.is_file() else []
