"""From a composed config to plain objects: `build` (one `_target_`, logged, with a user's mistakes as one-line
errors) and `validate` (every key checked before any work); the overrides a run was started with."""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from hydra.utils import instantiate
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm.errors import ConfigError, LLMError, check_int, check_number, check_seed
from llm.model import gpt_config
from llm.rundir.writable import check_writable_dir


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
    built["loggers"] = [build(node, f"logger {name}") for name, node in (cfg.get("logger") or {}).items() if node]
    built["peft"] = build(cfg.peft, "peft") if cfg.get("peft") else None  # LoRA's settings, checked
    model_keys = {k: v for k, v in plain["model"].items() if k != "_target_"}
    gpt_config(**{"vocab_size": 1, **model_keys, "rope_scaling": plain.get("extrapolation")})
    for group in ("data", "tokenizer", "post_data"):
        _check_tree(group, plain.get(group) or {})
    _check_tree("task.data", plain["task"].get("data") or {})
    check_cache_dirs(plain)
    return built


def check_cache_dirs(plain: dict) -> None:
    """The cache dirs this run will write (the BPE's unless init_from brings a tokenizer, the token cache's) are
    directories it can write: else one line naming the key (`cache_dir` when the group takes the top-level one)."""
    used = {"task.data.cache_dir": (plain["task"].get("data") or {}).get("cache_dir")}
    if not plain.get("init_from"):
        used["tokenizer.cache_dir"] = (plain.get("tokenizer") or {}).get("cache_dir")
    for key, value in used.items():
        if value is not None:
            check_writable_dir(
                "cache_dir" if value == plain.get("cache_dir") else key, value, hint=" (or LLM_CACHE_DIR)"
            )


def read_overrides(run_dir: Path) -> list[str]:
    """The command line's overrides of a run, as Hydra recorded them in `<run dir>/.hydra/overrides.yaml`."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.is_file() else []
