"""One run from a composed config: resolve `init_from`, build the plain objects (each `_target_` logged), fit; or,
for task=export, write the init_from model as a Hugging Face model dir; for task=lm_eval, score it with lm-eval.

run.py calls `run` from its Hydra job; with `trainer.nproc_per_node` > 1, `run` starts that many workers, each of
which calls `train` (this module's function, imported by name) with the resolved config as a plain dict. This
is the one module of `llm` that reads a Hydra config; everything it builds takes plain arguments. Importing it
registers the OmegaConf resolvers conf/hydra/default.yaml uses (run.py, and SLURM tasks that unpickle run.py's
task function, import it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hydra.types import RunMode
from loguru import logger
from omegaconf import DictConfig, OmegaConf, open_dict

from llm.checkpoint.adapters import attach_lora
from llm.checkpoint.files import ARCH_KEYS, check_compatible, read_json, resolve_checkpoint
from llm.data.tokenizer import load_pretrained
from llm.dist.env import env_rank, main_process_first, process_group
from llm.dist.launch import launch
from llm.dist.signals import Interrupted, Preempted, StopSignals, stop_exception
from llm.errors import ConfigError, LLMError, check_int
from llm.export import load_weights
from llm.hf import (
    fetch_hub_model,
    harness,
    is_hf_model_dir,
    load_hf_tokenizer,
    looks_like_hub_name,
    read_hf_config,
)
from llm.sweep.jobs import continue_sweep_job, trial_settings
from llm.sweep.pruning import TrialPruner
from llm.tasks.config import build, read_overrides, validate
from llm.tasks.export import export
from llm.tasks.lm_eval import lm_eval
from llm.train.trainer import RunInfo, Trainer
from llm.utils import git_commit, seed_everything


def resolve_init_from(cfg: DictConfig, explicit: set[str]) -> DictConfig:
    """init_from resolved to one checkpoint dir (or a Hugging Face model dir), and the model keys not set on the
    command line (`explicit`: the keys of the command-line overrides) taken from its config. The RoPE scaling of
    an HF model (and of a checkpoint that task=export writes out) is the model's own unless extrapolation is set."""
    need = cfg.task.get("requires_init_from")  # true: an error without init_from; warn: a warning (SFT)
    if need == "warn" and not cfg.init_from and not cfg.task.get("allow_scratch"):
        logger.warning(
            f"task={cfg.task.name} without init_from trains from RANDOM weights, not from a pretrained "
            f"model: pass init_from=<run or checkpoint dir> (or init_from=latest:pretrain, or a Hugging "
            f"Face model), or set task.allow_scratch=true if this is on purpose (no warning)"
        )
    elif need and not cfg.init_from and not cfg.task.get("allow_scratch"):
        raise ConfigError(
            f"task={cfg.task.name} starts from a trained model: set init_from=<run or checkpoint dir> "
            f"(or init_from=latest:<task>), or task.allow_scratch=true to start from random weights"
        )
    if not cfg.init_from:
        return cfg
    if looks_like_hub_name(cfg.init_from):  # owner/name: a model on the Hugging Face hub
        with open_dict(cfg):
            cfg.init_from = str(fetch_hub_model(cfg.init_from))
    hf_dir = not str(cfg.init_from).startswith(("latest:", "best:")) and is_hf_model_dir(
        Path(str(cfg.init_from)).expanduser()
    )
    if hf_dir:
        init_ckpt = Path(str(cfg.init_from)).expanduser().absolute()
        saved = read_hf_config(init_ckpt)
        load_hf_tokenizer(init_ckpt, saved["vocab_size"])  # a tokenizer that does not fit fails before any work
    else:
        init_ckpt = resolve_checkpoint(cfg.init_from, "init_from")
        saved = read_json(init_ckpt, "model_config.json")
    with open_dict(cfg):  # the checkpoint's architecture, except model keys set on the command line
        for key in (*ARCH_KEYS, "max_seq_len", "rope_theta"):
            if key in saved and key in cfg.model and "model" not in explicit and f"model.{key}" not in explicit:
                cfg.model[key] = saved[key]  # before anything interpolates ${model.*}
        if "model.max_seq_len" not in explicit and saved.get("pos_emb") == "rope":
            cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.trainer.seq_len)  # a longer-context fine-tune
        exports = cfg.task.name in ("export", "lm_eval")
        if (hf_dir or exports) and not any(k.split(".")[0] == "extrapolation" for k in explicit):
            cfg.extrapolation = saved.get("rope_scaling") or {"type": "none"}
        cfg.init_from = str(init_ckpt)
    return cfg


def run(cfg: DictConfig, hydra: DictConfig) -> dict:
    """The Hydra job (`hydra`: its Hydra config): resolve init_from against the command-line overrides, then train
    here or in trainer.nproc_per_node worker processes (they get the resolved config, not Hydra: a -m sweep runs
    each job as its own process group). A sweep job run again by the same command continues where it stopped; an
    Optuna trial (`+trial=<n>`) learns where its study is. From here a stop signal or Ctrl-C ends the run at the
    next check (llm.dist.signals.StopSignals), saving a checkpoint once there is one to save."""
    stop = StopSignals()
    with stop.installed():
        try:
            return _run(cfg, hydra, stop)
        except LLMError:
            if stop.received:  # e.g. the tokenizer processes ended by the same signal: the signal is why
                raise stop.stopped("stopped before anything could be saved") from None
            raise


def _run(cfg: DictConfig, hydra: DictConfig, stop: StopSignals) -> dict:
    run_dir, overrides = Path(hydra.runtime.output_dir), [str(o) for o in hydra.overrides.task]
    if hydra.mode == RunMode.MULTIRUN:
        finished = continue_sweep_job(cfg, run_dir, overrides)
        if finished is not None:
            return finished
    explicit = {o.split("=")[0].lstrip("+~") for o in overrides}
    rescaled = any(k.split(".")[0] == "extrapolation" for k in explicit)
    lm_eval_version = harness.require_lm_eval() if cfg.task.name == "lm_eval" else None  # before any work
    cfg = resolve_init_from(cfg, explicit)
    stop.check("after resolving init_from")
    if cfg.task.name == "export":
        return export(cfg, run_dir)
    if cfg.task.name == "lm_eval":
        return lm_eval(cfg, run_dir, lm_eval_version, rescaled)
    if cfg.get("trial") is not None:  # an Optuna trial: where its study is
        with open_dict(cfg):
            cfg.trial = trial_settings(cfg, hydra)
    nproc = check_int("trainer.nproc_per_node", cfg.trainer.get("nproc_per_node") or 1, 1)
    if nproc > 1:
        validate(cfg)  # here, once, before any worker starts
        return launch(
            train,
            nproc,
            OmegaConf.to_container(cfg, resolve=True),
            str(run_dir),
            reraise=(Interrupted, Preempted),
            on_signal=stop_exception,
        )
    return train(cfg, run_dir, stop)


def train(cfg: DictConfig | dict, run_dir: str | Path, stop: StopSignals | None = None) -> dict:
    """Build everything from a resolved config and train, in this process's group (one process, one rank of
    torchrun / SLURM, or one worker of `launch`). `stop`: the job's stop signals (a worker catches its own)."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    stop = stop or StopSignals()
    with process_group(cfg.trainer.get("device", "auto")), stop.installed():
        return _train(cfg, Path(run_dir), stop)


def _train(cfg: DictConfig, run_dir: Path, stop: StopSignals) -> dict:
    cheap = validate(cfg)  # before the tokenizer and the data, which may take minutes
    seed_everything(cfg.seed)
    init_ckpt = Path(cfg.init_from) if cfg.init_from else None
    hf_dir = init_ckpt is not None and is_hf_model_dir(init_ckpt)
    saved = None
    if init_ckpt is not None:
        saved = read_hf_config(init_ckpt) if hf_dir else read_json(init_ckpt, "model_config.json")
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    if init_ckpt is not None:  # the earlier run's tokenizer, so token ids mean the same
        logger.info(f"init_from: {init_ckpt}" + (" (a Hugging Face model dir)" if hf_dir else ""))
        tokenizer = (
            load_hf_tokenizer(init_ckpt, saved["vocab_size"])
            if hf_dir
            else load_pretrained(str(init_ckpt / "tokenizer"))
        )
    else:
        with main_process_first():  # rank 0 trains and caches a tokenizer; the other ranks reuse it
            tokenizer = build(cfg.tokenizer, "tokenizer")
    stop.check("after building the tokenizer")
    data = build(cfg.task.data, "data", tokenizer=tokenizer)  # may add chat tokens to the tokenizer
    rope_scaling = OmegaConf.to_container(cfg.extrapolation, resolve=True) if cfg.get("extrapolation") else None
    if saved is not None:  # keys the model presets do not carry (an imported model's untied head, norm eps, ...)
        extra = {
            k: saved[k]
            for k in (*ARCH_KEYS, "norm_eps", "init_std", "family")
            if k in saved and k not in cfg.model and k != "vocab_size"
        }
        model = build(cfg.model, "model", vocab_size=saved["vocab_size"], rope_scaling=rope_scaling, **extra)
        check_compatible(saved, model.config.to_dict(), "init_from", init_ckpt)
        load_weights(init_ckpt, model)  # an HF dir, a checkpoint, a LoRA run's (its base + adapters merged)
        if len(tokenizer) > model.config.vocab_size:
            logger.info(f"model: vocabulary grown from {model.config.vocab_size} to {len(tokenizer)} tokens")
            model.resize_vocab(len(tokenizer))
    else:
        model = build(cfg.model, "model", vocab_size=len(tokenizer), rope_scaling=rope_scaling)
    if cheap["peft"] is not None:  # LoRA: adapters on the linear layers, the base frozen (and recorded)
        attach_lora(model, cheap["peft"], init_ckpt, saved["vocab_size"] if saved is not None else None)
    logger.info(f"model: {model.num_params():,} parameters")
    stop.check("after building the model")
    objective, optim, loggers, settings = cheap["objective"], cheap["optim"], cheap["loggers"], cheap["settings"]
    early_stop = TrialPruner(**cfg.trial) if cfg.get("trial") and env_rank() == 0 else None  # a sweep trial
    run_info = RunInfo(
        run_dir=str(run_dir),
        task=cfg.task.name,
        seed=cfg.seed,
        resume=cfg.resume,
        config=plain_cfg,
        overwrite=bool(cfg.get("overwrite")),
        fingerprint=run_fingerprint(plain_cfg, tokenizer),
        overrides=tuple(read_overrides(run_dir)),
        git_commit=git_commit(Path(__file__).parent),
    )
    return Trainer(
        model,
        data,
        objective,
        optim,
        settings,
        run_info,
        tokenizer=tokenizer,
        loggers=loggers,
        early_stop=early_stop,
        stop=stop,
    ).fit()


def run_fingerprint(plain_cfg: dict, tokenizer) -> dict:
    """What a resumed run must share with its checkpoint to continue it exactly: seed, data, tokenizer (a digest of
    its vocabulary), batch and sequence length. Saved in every checkpoint; `resume` compares."""
    data = {k: v for k, v in plain_cfg["task"]["data"].items() if k not in ("cache_dir", "num_proc")}
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "seed": plain_cfg["seed"],
        "trainer.batch_size": plain_cfg["trainer"]["batch_size"],
        "trainer.seq_len": plain_cfg["trainer"]["seq_len"],
        "task.data": data,
        "peft": plain_cfg.get("peft"),
        "tokenizer": f"{len(tokenizer)} tokens, sha256 {hashlib.sha256(vocab.encode()).hexdigest()[:16]}",
    }
