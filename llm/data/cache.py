"""The cache dir (`cache_dir`: trained tokenizers under `tokenizers/`, token shards under `data/`): checked once
before any work, shared safely by concurrent runs, and healed when an entry is damaged.

Every entry is a cache: anything in it can be made again from its source, so a damaged entry (a truncated or
garbled JSON file, a shard of the wrong size) is removed with a warning naming it and rebuilt, never used in part.
Entries are written under a temporary name and renamed, so a killed writer never leaves a half file that looks
whole; `file_lock` makes the processes that want one entry wait for the one that builds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
from pathlib import Path

from loguru import logger


@contextlib.contextmanager
def file_lock(path: Path):
    """One process at a time in the block (others wait for it, then see what it made); released if it dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_entry_json(path: Path, what: str) -> dict | None:
    """A cache entry's JSON file as a dict, or None (after a warning naming it) when it is missing its content:
    truncated, garbled or not an object. The caller rebuilds the entry."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        logger.warning(f"{what}: {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0]}); rebuilding it")
        return None
    if not isinstance(value, dict):
        logger.warning(f"{what}: {path} is damaged (not a JSON object); rebuilding it")
        return None
    return value


def discard(entry: Path, what: str, why: str) -> None:
    """Remove a damaged cache entry (a dir or a file) with a warning that names it and why."""
    logger.warning(f"{what}: cached {entry} {why}; rebuilding it")
    if entry.is_dir():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
