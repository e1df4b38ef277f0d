"""Who may write a run dir: one owner at a time, and never a fresh run over another run's work.

`claim(run_dir, resume, overwrite)` is the first thing a Hydra job does (before train.log is opened). It refuses a
dir that a live process holds (an exclusive `fcntl.flock` on `<run_dir>/.lock`, released by the kernel when its
process dies, so `kill -9` leaves no stale lock), and a dir that already holds another run's checkpoints, metrics
or results unless the run continues it (`resume`) or replaces it (`overwrite=true`). Only the process that runs
the Hydra job claims: rank 0 under torchrun / srun (the ranks share one dir), the launcher's parent under
`trainer.nproc_per_node`, each job of a `-m` sweep its own dir.

`clear(run_dir)` removes the previous run's artefacts once an `overwrite=true` run is about to train.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

from loguru import logger

from llm.errors import ConfigError

LOCK_FILE = ".lock"
OWNED = ("checkpoints", "metrics.jsonl", "results.json")  # what makes a dir another run's work
CLEARED = (*OWNED, "sample.txt", "tb", "wandb_run_id.txt")  # what overwrite=true replaces


def artefacts(run_dir: str | Path) -> list[str]:
    """The names in OWNED that `run_dir` holds (an empty `checkpoints/` dir does not count)."""
    run_dir = Path(run_dir)
    found = []
    for name in OWNED:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def check_fresh(run_dir: str | Path, resume, overwrite: bool) -> None:
    """ConfigError when a run that neither resumes nor overwrites would write into another run's dir."""
    if resume and overwrite:
        raise ConfigError(
            f"resume={resume!r} and overwrite=true contradict each other: a resumed run continues "
            f"its dir, overwrite=true replaces it; set one"
        )
    found = artefacts(run_dir)
    if found and not resume and not overwrite:
        raise ConfigError(
            f"run dir {run_dir} already holds another run's {', '.join(found)}; continue that run with "
            f"resume=auto, write somewhere else (hydra.run.dir=<new dir>), or replace it with "
            f"overwrite=true"
        )


class RunDirLock:
    """An exclusive lock on `<run_dir>/.lock` for as long as this object is open (or its process lives)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.file = None

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(
                f"run dir {self.path.parent} is in use by another run ({holder}); wait for it to end, "
                f"or write somewhere else (hydra.run.dir=<new dir>)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")  # for the message a second writer gets
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def in_use(run_dir: str | Path) -> bool:
    """Whether a live process holds the lock of `run_dir` (creates nothing)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def claim(run_dir: str | Path, resume=None, overwrite: bool = False, held: RunDirLock | None = None) -> RunDirLock:
    """Lock `run_dir` for this run (or take `held`, its lock already taken), then check that this run may write
    there. Returns the held lock (a context manager); raises ConfigError, holding nothing, when another process
    writes there or the dir is another run's."""
    lock = held or RunDirLock(run_dir).acquire()
    try:
        check_fresh(run_dir, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def clear(run_dir: str | Path) -> list[str]:
    """Remove what a previous run wrote (overwrite=true, called just before the new run trains); returns the names."""
    removed = []
    for name in CLEARED:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        logger.warning(f"overwrite=true: removed the earlier run's {', '.join(removed)} from {run_dir}")
    return removed
