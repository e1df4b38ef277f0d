"""`launch`: N local workers through PyTorch's elastic launcher (`trainer.nproc_per_node`), each calling an
importable function of the package with a plain (already resolved) config dict."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import uuid
from collections.abc import Callable

import torch
from loguru import logger
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from llm.dist.env import env_world_size, shutdown
from llm.errors import ConfigError, LLMError
from llm.failures import explain, quiet_loggers
from llm.utils.logging import setup_logging


class LaunchError(LLMError):
    """A worker started by `launch` failed; the message is its error."""


def _worker(fn, cfg: dict, run_dir: str, threads: int | None, kwargs: dict):
    """One elastic worker: logging for its rank, the training function, the group torn down at the end."""
    if threads and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    setup_logging(run_dir, rank=int(os.environ.get("RANK", 0)))
    try:
        return fn(cfg, run_dir, **kwargs)
    except Exception as e:  # the parent reports it once, as one line (llm.failures); the traceback: this rank's log
        logger.opt(exception=e).debug("the error's traceback")
        if cfg.get("debug") or explain(e) in (None, e):
            raise
        raise explain(e) from None
    finally:
        shutdown()


def launch(
    fn,
    nproc: int,
    cfg: dict,
    run_dir: str,
    reraise: tuple[type[BaseException], ...] = (),
    on_signal: Callable[[str, str], BaseException] | None = None,
    kwargs: dict | None = None,
):
    """Run `fn(cfg, run_dir, **kwargs)` in `nproc` local worker processes forming one process group, through
    PyTorch's elastic launcher (what torchrun uses). `fn` is a module-level function of an importable module (the
    workers import it by name); `cfg` is the plain, resolved config (no Hydra in the workers); `kwargs` are
    picklable objects the parent built for them.
    Returns rank 0's return value. A worker's failure raises LaunchError with its message, or — when its exception
    class is one of `reraise` (by name) — that exception class again, in this process. SIGTERM, SIGUSR1/SIGUSR2
    (warnings before a time limit), SIGINT, ... reaching this process are passed on to the workers (which may save
    and stop), then raise `on_signal(signal name, message)` here (if given)."""
    if env_world_size() > 1:
        raise ConfigError(
            f"trainer.nproc_per_node={nproc} inside an already distributed launch "
            f"(WORLD_SIZE={env_world_size()}); set trainer.nproc_per_node=1 under torchrun or SLURM"
        )
    if fn.__module__ == "__main__":
        raise ValueError(f"launch needs a function the workers can import, not {fn.__name__} of a script")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"llm-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
        monitor_interval=0.1,
    )
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    if "signals_to_handle" in fields:  # workers get the signal, and time to write a checkpoint
        config.signals_to_handle = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
    if "shutdown_timeout" in fields:
        config.shutdown_timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 300))
    threads = max(1, (os.cpu_count() or 1) // nproc) if not torch.cuda.is_available() else None
    logger.info(f"launching {nproc} worker processes (elastic launcher, one process group)")
    quiet = not (cfg.get("debug") or os.environ.get("LLM_DEBUG"))
    try:
        # the launcher's own lines (a failed worker's whole traceback) off: the caller reports it once, in one line
        with quiet_loggers(("torch.distributed.elastic", "torch.multi"), quiet):
            results = elastic_launch(config, _worker)(fn, cfg, run_dir, threads, kwargs or {})
    except SignalException as e:
        if on_signal is None:
            raise
        name = signal.Signals(e.sigval).name
        raise on_signal(name, f"signal {name}: the workers were stopped") from e
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", message)
        message = str(message or f"exit code {failure.exitcode}").strip().splitlines()[0]
        ours = re.match(r"(\w+): ?(.*)", message)
        for cls in reraise:
            if ours and ours.group(1) == cls.__name__:
                raise cls(ours.group(2)) from e
        if ours and ours.group(1) in {c.__name__ for c in _llm_error_classes()}:
            raise LaunchError(ours.group(2)) from e  # a one-line error of ours (config, data, ...)
        raise LaunchError(f"worker rank {rank} failed: {message}") from e
    return results[0]


def _llm_error_classes():
    stack, seen = [LLMError], []
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen
