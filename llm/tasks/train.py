"""The training tasks (pretrain, sft, dpo; eval_length, whose objective trains nothing): every one through the one
loop. `run` is their entry (conf/task/*.yaml `entry: llm.tasks.train.run`): init_from resolved, then `train` here
or in `trainer.nproc_per_node` worker processes (they import `train` by name and get the resolved config, the
model source and the objects `validate` built: each job is validated once, in the process that started it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf, open_dict

from llm.checkpoint.adapters import attach_lora
from llm.checkpoint.files import check_compatible
from llm.dist.env import env_rank, main_process_first, process_group
from llm.dist.launch import launch
from llm.dist.signals import Interrupted, Preempted, StopSignals, stop_exception
from llm.errors import check_int
from llm.sweep.jobs import trial_settings
from llm.sweep.pruning import TrialPruner
from llm.tasks.config import JobInfo, build, read_overrides, validate
from llm.tasks.source import EXTRA_KEYS, ModelSource, open_source
from llm.train.steps import split_batch
from llm.train.trainer import RunInfo, Trainer
from llm.utils import git_commit, seed_everything


def run(cfg: DictConfig, job: JobInfo) -> dict:
    """A training task's job: init_from resolved against the command-line overrides; an Optuna trial
    (`+trial=<n>`) learns where its study is; then train here or in trainer.nproc_per_node worker processes
    (a -m sweep runs each job as its own process group)."""
    source = open_source(cfg, job.explicit)
    job.stop.check("after resolving init_from")
    if cfg.get("trial") is not None:  # an Optuna trial: where its study is
        with open_dict(cfg):
            cfg.trial = trial_settings(cfg, job.hydra)
    nproc = check_int("trainer.nproc_per_node", cfg.trainer.get("nproc_per_node") or 1, 1)
    if nproc > 1:
        parts = validate(cfg)  # here, once, before any worker starts (the batch split over the ranks too)
        split_batch(cfg.trainer.batch_size, cfg.trainer.get("micro_batch_size"), nproc)
        return launch(
            train,
            nproc,
            OmegaConf.to_container(cfg, resolve=True),
            str(job.run_dir),
            reraise=(Interrupted, Preempted),
            on_signal=stop_exception,
            kwargs={"source": source, "parts": parts},
        )
    return train(cfg, job.run_dir, job.stop, source)


def train(
    cfg: DictConfig | dict,
    run_dir: str | Path,
    stop: StopSignals | None = None,
    source: ModelSource | None = None,
    parts: dict | None = None,
) -> dict:
    """Build everything from a resolved config and train, in this process's group (one process, one rank of
    torchrun / SLURM, or one worker of `launch`). `stop`: the job's stop signals (a worker catches its own);
    `source`: the resolved init_from (resolved here when not given); `parts`: what `validate` built for this job
    (validated here when not given)."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    stop = stop or StopSignals()
    if source is None and cfg.init_from:
        source = ModelSource.resolve(cfg.init_from)
    with process_group(cfg.trainer.get("device", "auto")), stop.installed():
        return _train(cfg, Path(run_dir), stop, source, parts)


def _train(cfg: DictConfig, run_dir: Path, stop: StopSignals, source: ModelSource | None, parts: dict | None) -> dict:
    parts = parts or validate(cfg)  # before the tokenizer and the data, which may take minutes
    seed_everything(cfg.seed)
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    if source is not None:  # the earlier run's tokenizer, so token ids mean the same
        logger.info(f"init_from: {source.path}" + (" (a Hugging Face model dir)" if source.hf else ""))
        tokenizer = source.tokenizer()
    else:
        with main_process_first():  # rank 0 trains and caches a tokenizer; the other ranks reuse it
            tokenizer = build(cfg.tokenizer, "tokenizer")
    stop.check("after building the tokenizer")
    data = build(cfg.task.data, "data", tokenizer=tokenizer)  # may add chat tokens to the tokenizer
    model = build_model(cfg, source, len(tokenizer), parts["rope_scaling"])
    if parts["peft"] is not None:  # LoRA: adapters on the linear layers, the base frozen (and recorded)
        attach_lora(model, parts["peft"], source and source.path, source.config["vocab_size"] if source else None)
    logger.info(f"model: {model.num_params():,} parameters")
    stop.check("after building the model")
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
    trainer = Trainer(
        model,
        data,
        parts["objective"],
        parts["optim"],
        parts["settings"],
        run_info,
        tokenizer=tokenizer,
        loggers=parts["loggers"],
        early_stop=early_stop,
        stop=stop,
        downstream=parts.get("evals"),
    )
    return trainer.fit()


def build_model(cfg: DictConfig, source: ModelSource | None, n_tokens: int, rope_scaling: dict | None):
    """The model of `cfg.model` with the RoPE scaling `validate` parsed from the extrapolation group: from random
    weights for `n_tokens` tokens, or with the source's weights (its vocabulary grown to `n_tokens` when the data
    added tokens)."""
    if source is None:
        return build(cfg.model, "model", vocab_size=n_tokens, rope_scaling=rope_scaling)
    saved = source.config  # keys the model presets do not carry (an imported model's untied head, norm eps, ...)
    extra = {k: saved[k] for k in EXTRA_KEYS if k in saved and k not in cfg.model and k != "vocab_size"}
    model = build(cfg.model, "model", vocab_size=saved["vocab_size"], rope_scaling=rope_scaling, **extra)
    check_compatible(saved, model.config.to_dict(), "init_from", source.path)
    source.load_weights(model)
    if n_tokens > model.config.vocab_size:
        logger.info(f"model: vocabulary grown from {model.config.vocab_size} to {n_tokens} tokens")
        model.resize_vocab(n_tokens)
    return model


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
