"""Rank-aware logging with loguru: rank 0 prints to the console (through tqdm, so progress bars stay intact);
every rank writes its file in the run dir (`train.log` on rank 0, `train_rank{r}.log` on the others)."""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger

CONSOLE_FORMAT = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}"
FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | rank {extra[rank]} | {message}"


def _console_sink(message) -> None:
    from tqdm.auto import tqdm

    tqdm.write(str(message), end="", file=sys.stderr)


def setup_logging(run_dir: str | Path | None, rank: int = 0, level: str = "INFO") -> None:
    logger.remove()
    logger.configure(extra={"rank": rank})
    if rank == 0:
        logger.add(_console_sink, level=level, format=CONSOLE_FORMAT, colorize=sys.stderr.isatty())
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        # loguru formats a path ({time}): the braces of a dir named by its overrides (a sweep job's
        # `+evals.tasks.x={...}`) are escaped
        path = str(log_file(run_dir, rank)).replace("{", "{{").replace("}", "}}")
        logger.add(path, level="DEBUG", format=FILE_FORMAT, enqueue=False)


def log_file(run_dir: str | Path, rank: int = 0) -> Path:
    """A rank's log in the run dir (everything at DEBUG and up, an error's traceback included)."""
    return Path(run_dir) / ("train.log" if rank == 0 else f"train_rank{rank}.log")
