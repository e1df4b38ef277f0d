"""One Hydra job: its config -> the task's entry. run.py calls `run` from its Hydra job; a sweep job that an
earlier attempt of the same sweep left behind is continued (or skipped, when it finished); then the entry that
`task.entry` names (conf/task/*.yaml, e.g. `llm.tasks.train.run`) is called as `entry(cfg, job)` and builds the
plain objects it needs. Adding a task is a module in llm/tasks/ and a yaml naming its entry; nothing here changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hydra.types import RunMode
from hydra.utils import get_method
from omegaconf import DictConfig

from llm.dist.signals import StopSignals
from llm.errors import ConfigError, LLMError
from llm.sweep.jobs import continue_sweep_job
from llm.tasks.config import JobInfo


def run(cfg: DictConfig, hydra: DictConfig) -> dict:
    """The Hydra job (`hydra`: its Hydra config) run by its task's entry. A sweep job run again by the same command
    continues where it stopped. From here a stop signal or Ctrl-C ends the run at the next check
    (llm.dist.signals.StopSignals), saving a checkpoint once there is one to save."""
    stop = StopSignals()
    with stop.installed():
        try:
            return _run(cfg, hydra, stop)
        except LLMError:
            if stop.received:  # e.g. the tokenizer processes ended by the same signal: the signal is why
                raise stop.stopped("stopped before anything could be saved") from None
            raise


def _run(cfg: DictConfig, hydra: DictConfig, stop: StopSignals) -> dict:
    job = JobInfo(Path(hydra.runtime.output_dir), [str(o) for o in hydra.overrides.task], hydra, stop)
    if hydra.mode == RunMode.MULTIRUN:
        finished = continue_sweep_job(cfg, job.run_dir, job.overrides)
        if finished is not None:
            return finished
    return task_entry(cfg)(cfg, job)


def task_entry(cfg: DictConfig) -> Callable[[DictConfig, JobInfo], dict]:
    """The function `task.entry` names (a module-level function `entry(cfg, job) -> results`)."""
    name = cfg.task.get("entry")
    if not name:
        raise ConfigError(
            f"task={cfg.task.get('name')}: task.entry is not set; it names the function that runs the task "
            f"(e.g. llm.tasks.train.run)"
        )
    try:
        return get_method(str(name))
    except Exception as e:
        raise ConfigError(f"task.entry={name!r}: {str(e).splitlines()[0]}") from None
