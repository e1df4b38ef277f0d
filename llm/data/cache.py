"""The cache dir (`cache_dir`: trained tokenizers under `tokenizers/`, token shards under `data/`): checked once
before any work, shared safely by concurrent runs, and healed when an entry is damaged.

Every entry is a cache: anything in it can be made again from its source, so a damaged entry (a truncated or
garbled JSON file, a shard of the wrong size) is removed with a warning naming it and rebuilt, never used in part.
Entries are written under a temporary name and renamed, so a killed writer never leaves a half file that looks
whole; `file_lock` makes the processes that want one entry wait for the one that builds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import shutil
from pathlib import Path

from loguru import logger

from llm.errors import ConfigError


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


@contextlib.contextmanager
def entry_lock(path: Path):
    """`file_lock(path)` for a cache entry, yielding True; False (no lock) when the cache dir cannot be written
    (a read-only mount of a shared cache, no permission): its complete entries are then read as they are, and a
    missing one is an error (`missing_entry`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "w")
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        yield False
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def missing_entry(what: str, entry: Path, why: str = "is not in the cache") -> ConfigError:
    """The error for an entry a read-only cache lacks (or holds damaged): it cannot be made there."""
    return ConfigError(
        f"{what}: {entry} {why}, and the cache dir cannot be written to make it: run once with a writable "
        f"cache_dir (or LLM_CACHE_DIR) to fill it, or point cache_dir to a writable dir"
    )


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
    try:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    except OSError:  # a read-only cache: the damaged entry cannot be replaced there
        raise missing_entry(what, entry, why) from None
    logger.warning(f"{what}: cached {entry} {why}; rebuilding it")
