"""One run from a composed config: resolve `init_from`, build the plain objects (each `_target_` logged), fit.

run.py calls `run` from its Hydra job; with `trainer.nproc_per_node` > 1, `run` starts that many workers, each of
which calls `train` (this module's function, imported by name) with the resolved config as a plain dict. This
is the one module of `llm` that reads a Hydra config; everything it builds takes plain arguments. Importing it
registers the OmegaConf resolvers conf/hydra/default.yaml uses (run.py, and SLURM tasks that unpickle run.py's
task function, import it).
"""

from __future__ import annotations

import hashlib
import math
import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from loguru import logger
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from llm.data.tokenizer import load_pretrained
from llm.errors import ConfigError, LLMError, check_int, check_number, check_seed
from llm.model import gpt_config
from llm.train import rundir
from llm.train.checkpoint import ARCH_KEYS, check_compatible, load_model_weights, read_json, resolve_checkpoint
from llm.train.cluster import Preempted, env_rank, launch, main_process_first, process_group
from llm.train.trainer import RunInfo, Trainer
from llm.utils import seed_everything


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


def resolve_init_from(cfg: DictConfig, explicit: set[str]) -> DictConfig:
    """init_from resolved to one checkpoint dir, and the model keys not set on the command line (`explicit`: the
    keys of the command-line overrides) taken from that checkpoint."""
    if cfg.task.get("requires_init_from") and not cfg.init_from and not cfg.task.get("allow_scratch"):
        raise ConfigError(f"task={cfg.task.name} starts from a trained model: set init_from=<run or checkpoint dir> "
                          f"(or init_from=latest:<task>), or task.allow_scratch=true to start from random weights")
    if not cfg.init_from:
        return cfg
    init_ckpt = resolve_checkpoint(cfg.init_from, "init_from")
    saved = read_json(init_ckpt, "model_config.json")
    with open_dict(cfg):  # the checkpoint's architecture, except model keys set on the command line
        for key in (*ARCH_KEYS, "max_seq_len", "rope_theta"):
            if key in saved and key in cfg.model and "model" not in explicit and f"model.{key}" not in explicit:
                cfg.model[key] = saved[key]  # before anything interpolates ${model.*}
        if "model.max_seq_len" not in explicit and saved.get("pos_emb") == "rope":
            cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.trainer.seq_len)  # a longer-context fine-tune
        cfg.init_from = str(init_ckpt)
    return cfg


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict:
    """The Hydra job: resolve init_from against the command-line `overrides`, then train here or in
    trainer.nproc_per_node worker processes (they get the resolved config, not Hydra: a -m sweep runs each job
    as its own process group)."""
    cfg = resolve_init_from(cfg, {o.split("=")[0].lstrip("+~") for o in overrides})
    nproc = check_int("trainer.nproc_per_node", cfg.trainer.get("nproc_per_node") or 1, 1)
    if nproc > 1:
        validate(cfg)  # here, once, before any worker starts
        return launch(train, nproc, OmegaConf.to_container(cfg, resolve=True), str(run_dir), reraise=(Preempted,),
                      on_signal=Preempted)
    return train(cfg, run_dir)


def train(cfg: DictConfig | dict, run_dir: str | Path) -> dict:
    """Build everything from a resolved config and train, in this process's group (one process, one rank of
    torchrun / SLURM, or one worker of `launch`)."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    with process_group(cfg.trainer.get("device", "auto")):
        return _train(cfg, Path(run_dir))


# Keys of the data, tokenizer and post-training groups that count something (the least value allowed; null passes:
# a default derived later), and the fractions: checked in every group before any work, with the rest of `validate`.
COUNT_KEYS = {"max_bytes": 1, "max_documents": 1, "num_examples": 1, "eval_samples": 0, "num_proc": 1,
              "min_frequency": 1, "max_train_bytes": 1, "offset": 0, "split_seed": 0, "seq_len": 1, "windows": 1,
              "passkey_trials": 1, "batch_size": 1}
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
            check_seed(name, value) if key.endswith("seed") else check_int(name, value, COUNT_KEYS[key], allow_none=True)
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
    for group in ("data", "tokenizer", "post_data"):
        _check_tree(group, plain.get(group) or {})
    _check_tree("task.data", plain["task"].get("data") or {})
    built = {"settings": build(cfg.trainer, "trainer"), "optim": build(cfg.optim, "optimizer"),
             "objective": build(cfg.task.objective, "objective")}
    built["loggers"] = [build(node, f"logger {name}") for name, node in (cfg.get("logger") or {}).items() if node]
    model_keys = {k: v for k, v in plain["model"].items() if k != "_target_"}
    gpt_config(**{"vocab_size": 1, **model_keys, "rope_scaling": plain.get("extrapolation")})
    return built


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    cheap = validate(cfg)  # before the tokenizer and the data, which may take minutes
    seed_everything(cfg.seed)
    init_ckpt = Path(cfg.init_from) if cfg.init_from else None
    saved = read_json(init_ckpt, "model_config.json") if init_ckpt is not None else None
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    if init_ckpt is not None:  # the earlier run's tokenizer, so token ids mean the same
        logger.info(f"init_from: {init_ckpt}")
        tokenizer = load_pretrained(str(init_ckpt / "tokenizer"))
    else:
        with main_process_first():  # rank 0 trains and caches a tokenizer; the other ranks reuse it
            tokenizer = build(cfg.tokenizer, "tokenizer")
    data = build(cfg.task.data, "data", tokenizer=tokenizer)  # may add chat tokens to the tokenizer
    rope_scaling = OmegaConf.to_container(cfg.extrapolation, resolve=True) if cfg.get("extrapolation") else None
    if saved is not None:
        model = build(cfg.model, "model", vocab_size=saved["vocab_size"], rope_scaling=rope_scaling)
        check_compatible(saved, model.config.to_dict(), "init_from", init_ckpt)
        load_model_weights(init_ckpt, model)
        if len(tokenizer) != model.config.vocab_size:
            logger.info(f"model: vocabulary grown from {model.config.vocab_size} to {len(tokenizer)} tokens")
            model.resize_vocab(len(tokenizer))
    else:
        model = build(cfg.model, "model", vocab_size=len(tokenizer), rope_scaling=rope_scaling)
    logger.info(f"model: {model.num_params():,} parameters")
    objective, optim, loggers, settings = cheap["objective"], cheap["optim"], cheap["loggers"], cheap["settings"]
    run_info = RunInfo(run_dir=str(run_dir), task=cfg.task.name, seed=cfg.seed, resume=cfg.resume, config=plain_cfg,
                       overwrite=bool(cfg.get("overwrite")), fingerprint=run_fingerprint(plain_cfg, tokenizer))
    return Trainer(model, data, objective, optim, settings, run_info, tokenizer=tokenizer, loggers=loggers).fit()


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> rundir.RunDirLock | None:
    """The run dir's lock for this Hydra job (rank 0 only: the ranks of torchrun / srun share the dir), after
    checking that this run may write there (see llm.train.rundir). None on the other ranks."""
    if env_rank() != 0:
        return None
    return rundir.claim(run_dir, cfg.get("resume"), bool(cfg.get("overwrite")))


def run_fingerprint(plain_cfg: dict, tokenizer) -> dict:
    """What a resumed run must share with its checkpoint to continue it exactly: seed, data, tokenizer (a digest of
    its vocabulary), batch and sequence length. Saved in every checkpoint; `resume` compares."""
    data = {k: v for k, v in plain_cfg["task"]["data"].items() if k not in ("cache_dir", "num_proc")}
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"seed": plain_cfg["seed"], "trainer.batch_size": plain_cfg["trainer"]["batch_size"],
            "trainer.seq_len": plain_cfg["trainer"]["seq_len"], "task.data": data,
            "tokenizer": f"{len(tokenizer)} tokens, sha256 {hashlib.sha256(vocab.encode()).hexdigest()[:16]}"}


# ---------------------------------------------------------------------------------------------- resolvers
def safe_dirname(name: str, max_len: int = 120) -> str:
    """A sweep job's dir name from its overrides: '/' replaced, and names longer than max_len cut with a short
    hash of the whole appended (file systems refuse names over 255 bytes)."""
    name = str(name).replace("/", "_")
    if len(name) <= max_len:
        return name
    return name[: max_len - 9] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]


def hydra_output_subdir(default: str = ".hydra", resume=None, overwrite=False) -> str | None:
    """Only rank 0 writes Hydra's `.hydra/` (the other ranks of torchrun / srun compose the same config), and never
    into a dir that another process writes or that holds a run, unless overwrite=true replaces it: a resumed run
    keeps the first run's `.hydra/`, and a run that is refused changes nothing there."""
    if env_rank() != 0:
        return None
    runtime = HydraConfig.get().runtime if HydraConfig.initialized() else None
    run_dir = None if runtime is None or OmegaConf.is_missing(runtime, "output_dir") else runtime.output_dir
    if not run_dir:  # composed without a run (the compose API, --cfg)
        return default
    replacing = overwrite is True and not resume  # with resume too, the run is refused
    if rundir.in_use(run_dir) or (rundir.artefacts(run_dir) and not replacing):
        return None
    return default


OmegaConf.register_new_resolver("safe_dirname", safe_dirname, replace=True)
OmegaConf.register_new_resolver("llm_output_subdir", hydra_output_subdir, replace=True)
