"""Entry point: compose the config with Hydra, build plain objects from it, train. Everything else is in `llm/`.

    python run.py                                  # tiny model, pretraining on the standard library, CPU
    python run.py model=125m trainer=gpu optim.lr=6e-4
    python run.py -m optim.lr=1e-4,3e-4            # a sweep: one job dir each under multirun_outputs/
    python run.py trainer.nproc_per_node=4         # 4 local worker processes, one process group (DDP by default)
    torchrun --nproc_per_node=4 run.py             # the same through torchrun (multi-node: --nnodes, --rdzv-*)
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from loguru import logger
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from llm import job  # importing it registers the resolvers conf/hydra/default.yaml uses
from llm.errors import LLMError
from llm.train.cluster import PREEMPTED_EXIT_CODE, Preempted, env_rank, prepare_launch, shutdown
from llm.utils.logging import setup_logging


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        lock = job.claim_run_dir(cfg, run_dir)  # before train.log: a refused run writes nothing there
    except LLMError as e:
        if cfg.get("debug") or os.environ.get("LLM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    setup_logging(run_dir, rank=env_rank())
    logger.info(f"run dir: {run_dir}")
    try:
        with lock or contextlib.nullcontext():  # held until the job ends (each job of a -m sweep its own dir)
            results = job.run(cfg, run_dir, list(HydraConfig.get().overrides.task))
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
    prepare_launch()  # under torchrun / srun: join the group; all ranks share rank 0's run-dir stamp
    try:
        main()
    finally:
        shutdown()
