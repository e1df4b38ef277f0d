"""Entry point: compose the config with Hydra, build plain objects from it, train. Everything else is in `llm/`.

    python run.py                                  # tiny model, pretraining on the standard library, CPU
    python run.py model=125m trainer=gpu optim.lr=6e-4
    python run.py -m optim.lr=1e-4,3e-4            # a sweep: one job dir each under multirun_outputs/
    python run.py trainer.nproc_per_node=4         # 4 local worker processes, one process group (DDP by default)
    torchrun --nproc_per_node=4 run.py             # the same through torchrun (multi-node: --nnodes, --rdzv-*)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from loguru import logger
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from llm.errors import ConfigError, LLMError
from llm.train import distributed
from llm.train.trainer import PREEMPTED_EXIT_CODE, Preempted
from llm.utils import seed_everything  # importing llm.utils registers the resolvers conf/hydra/default.yaml uses
from llm.utils.logging import setup_logging


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


def resolve_init_from(cfg: DictConfig) -> DictConfig:
    """The Hydra job's own part of the config: init_from resolved to one checkpoint dir, and the model keys not set
    on the command line taken from that checkpoint. (Workers of trainer.nproc_per_node get the result.)"""
    from llm.train.checkpoint import ARCH_KEYS, read_json, resolve_checkpoint

    if cfg.task.get("requires_init_from") and not cfg.init_from and not cfg.task.get("allow_scratch"):
        raise ConfigError(f"task={cfg.task.name} starts from a trained model: set init_from=<run or checkpoint dir> "
                          f"(or init_from=latest:<task>), or task.allow_scratch=true to start from random weights")
    if not cfg.init_from:
        return cfg
    init_ckpt = resolve_checkpoint(cfg.init_from, "init_from")
    saved = read_json(init_ckpt, "model_config.json")
    explicit = {o.split("=")[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    with open_dict(cfg):  # the checkpoint's architecture, except model keys set on the command line
        for key in (*ARCH_KEYS, "max_seq_len", "rope_theta"):
            if key in saved and key in cfg.model and "model" not in explicit and f"model.{key}" not in explicit:
                cfg.model[key] = saved[key]  # before anything interpolates ${model.*}
        if "model.max_seq_len" not in explicit and saved.get("pos_emb") == "rope":
            cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.trainer.seq_len)  # a longer-context fine-tune
        cfg.init_from = str(init_ckpt)
    return cfg


def train(cfg: DictConfig | dict, run_dir: str | Path) -> dict:
    """Build everything from a resolved config and train. Called by the Hydra job itself (one process, or one
    rank of torchrun / SLURM), and by every worker of trainer.nproc_per_node with the config as a plain dict."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    with distributed.process_group(cfg.trainer.get("device", "auto")):
        return _train(cfg, Path(run_dir))


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    from llm.train.checkpoint import check_compatible, load_model_weights, read_json

    seed_everything(cfg.seed)
    init_ckpt = Path(cfg.init_from) if cfg.init_from else None
    saved = read_json(init_ckpt, "model_config.json") if init_ckpt is not None else None
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    with open_dict(cfg):
        cfg.trainer.pop("nproc_per_node", None)  # the launcher's key (main), not the Trainer's
    if init_ckpt is not None:  # the earlier run's tokenizer, so token ids mean the same
        from llm.data.tokenizer import load_pretrained

        logger.info(f"init_from: {init_ckpt}")
        tokenizer = load_pretrained(str(init_ckpt / "tokenizer"))
    else:
        with distributed.main_process_first():  # rank 0 trains and caches a tokenizer; the other ranks reuse it
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
    objective = build(cfg.task.objective, "objective")
    optim = build(cfg.optim, "optimizer")
    loggers = [build(node, f"logger {name}") for name, node in (cfg.get("logger") or {}).items() if node]
    # objects are passed to the partial, not to instantiate(), which would re-instantiate `_target_`s inside them
    make_trainer = build(cfg.trainer, "trainer", _partial_=True)
    try:
        trainer = make_trainer(model=model, data=data, objective=objective, optim=optim, loggers=loggers,
                               run_dir=str(run_dir), tokenizer=tokenizer, run_config=plain_cfg, task=cfg.task.name,
                               seed=cfg.seed, resume=cfg.resume)
    except TypeError as e:
        raise ConfigError(f"trainer ({cfg.trainer._target_}): {e}") from e
    return trainer.fit()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_logging(run_dir, rank=distributed.env_rank())
    logger.info(f"run dir: {run_dir}")
    try:
        cfg = resolve_init_from(cfg)
        nproc = cfg.trainer.get("nproc_per_node") or 1
        if nproc > 1:  # workers get the resolved config, not Hydra: a -m sweep runs each job as its own group
            results = distributed.launch(train, nproc, OmegaConf.to_container(cfg, resolve=True), str(run_dir),
                                         reraise=(Preempted,), on_signal=Preempted)
        else:
            results = train(cfg, run_dir)
    except Preempted:
        sys.exit(PREEMPTED_EXIT_CODE)  # a checkpoint was saved; resume=auto continues
    except (LLMError, OmegaConfBaseException) as e:
        if cfg.get("debug") or os.environ.get("LLM_DEBUG"):
            raise
        logger.remove()
        print(f"error: {e}".splitlines()[0] if isinstance(e, OmegaConfBaseException) else f"error: {e}",
              file=sys.stderr)
        sys.exit(2)
    return results.get("val_loss")  # what a Hydra sweeper minimises


def check_output_dir(argv: list[str]) -> None:
    """Fail with one line, before Hydra starts, when the run or sweep dir cannot be created."""
    import tempfile

    sweep = "-m" in argv or "--multirun" in argv
    target = "multirun_outputs" if sweep else "outputs"
    for arg in argv:
        if arg.startswith("hydra.sweep.dir=" if sweep else "hydra.run.dir="):
            target = arg.split("=", 1)[1]
    if "${" in target:
        return
    path = Path(target).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        print(f"error: cannot write the output dir {path}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_output_dir(sys.argv[1:])
    distributed.prepare_launch()  # under torchrun / srun: join the group; all ranks share rank 0's run-dir stamp
    try:
        main()
    finally:
        distributed.shutdown()
