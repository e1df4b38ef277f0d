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
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from loguru import logger
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException as ConfError

from llm import job
from llm.dist.env import env_rank, first_to_report, prepare_launch, shutdown
from llm.dist.signals import INTERRUPTED_EXIT_CODE, Preempted
from llm.errors import LLMError
from llm.failures import explain, report
from llm.rundir import resolvers  # importing it registers the resolvers conf/hydra/default.yaml uses
from llm.rundir.writable import check_writable_dir
from llm.sweep import jobs as sweep_jobs
from llm.utils.logging import log_file, setup_logging


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir, in_sweep = Path(hydra_cfg.runtime.output_dir), hydra_cfg.mode == RunMode.MULTIRUN
    try:  # before train.log: a refused run writes nothing there
        lock = resolvers.claim_run_dir(cfg, run_dir, in_sweep)
    except Exception as e:  # the run dir's lock cannot be taken (another run, a read-only or too long path)
        if cfg.get("debug") or os.environ.get("LLM_DEBUG") or explain(e) is None:
            raise
        say(f"error: {explain(e)}")
        if in_sweep:  # another process writes this job's dir: the sweep goes on without it
            return None
        sys.exit(2)
    setup_logging(run_dir, rank=env_rank())
    logger.info(f"run dir: {run_dir}")
    try:
        with lock or contextlib.nullcontext():  # held until the job ends (each job of a -m sweep its own dir)
            results = job.run(cfg, hydra_cfg)
    except Preempted as e:  # a signal (75) or Ctrl-C (130): a checkpoint was saved (or there was none to save yet);
        sys.exit(e.exit_code)  # resume=auto (or the same sweep again) continues
    except Exception as e:  # one line on the terminal (llm.failures); the traceback in train.log, or with debug=true
        if cfg.get("debug") or os.environ.get("LLM_DEBUG"):
            raise
        logger.opt(exception=e).debug("the error's traceback")  # train.log only (the terminal shows INFO and up)
        log = log_file(run_dir, env_rank())
        message = f"error: {e}".splitlines()[0] if isinstance(e, ConfError) else report(e, log)
        if in_sweep:  # one bad job never stops the sweep: it is marked failed in the summary
            logger.error(f"job failed: {message}")
            sweep_jobs.record_failure(run_dir, e)
            return None
        logger.remove()
        say(message)
        sys.exit(2)
    return results.get(cfg.get("optimized_metric") or "val_loss")  # what a Hydra sweeper optimises


def say(line: str) -> None:
    """The line that ends a run, on stderr: under torchrun / srun, once per machine however many ranks end with it
    (llm.dist.env.first_to_report)."""
    if first_to_report(line):
        print(line, file=sys.stderr)


def check_output_dir(argv: list[str]) -> str:
    """Fail with one line, before Hydra starts, when the run or sweep dir cannot be created; else return it."""
    sweep = "-m" in argv or "--multirun" in argv
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    target = "multirun_outputs" if sweep else "outputs"
    for arg in argv:
        if arg.startswith(f"{key}="):
            target = arg.split("=", 1)[1]
    if "${" in target:
        return target
    try:
        check_writable_dir(key, target, create=False)  # nothing is created: Hydra makes the dir
    except LLMError as e:
        say(f"error: {e}")
        sys.exit(2)
    return target


def outside_the_job(e: Exception, run_dir: str) -> int:
    """What escaped Hydra itself (composing the config, writing .hydra/ in `run_dir` to a full disk, ...), printed
    as one line (Hydra's own message for its config errors); the exit code."""
    if isinstance(e, CompactHydraException):  # as Hydra prints them: its message, then the OmegaConf cause
        cause = f"\n{e.__cause__}" if isinstance(e.__cause__, ConfError) else ""
        say(f"{e}{cause}")
        return 1
    if isinstance(e, OSError) and not e.filename:  # Hydra writing its .hydra/ files
        e.filename = run_dir
    say(f"error: {e}".splitlines()[0] if isinstance(e, ConfError) else report(e))
    return 2 if explain(e) is not None else 1


if __name__ == "__main__":
    output_dir = check_output_dir(sys.argv[1:])
    prepare_launch()  # under torchrun / srun: join the group; all ranks share rank 0's run-dir stamp
    debug = bool(os.environ.get("LLM_DEBUG") or os.environ.get("HYDRA_FULL_ERROR")) or "debug=true" in sys.argv
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what escapes it, instead of printing its traceback
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before the run caught it, or a second one: stop at once
        if debug:
            raise
        say(
            "\nerror: interrupted (Ctrl-C): stopped at once without saving; resume=auto continues from the "
            "newest checkpoint, if any"
        )
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Exception as e:
        if debug:
            raise
        sys.exit(outside_the_job(e, output_dir))
    finally:  # a sweep with failed jobs exits 2 from its summary callback (llm.sweep.summary.SweepFailed)
        resolvers.release_unclaimed()
        if not debug:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        shutdown()
