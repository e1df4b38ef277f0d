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
import os
import shutil
import tempfile
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


def check_writable_dir(key: str, value, create: bool = True, hint: str = "") -> Path:
    """The dir `value` (created if missing; with create=False its nearest existing parent is probed instead), or
    ConfigError naming `key` and the path when it is a file, lies under a file, or cannot be written (a probe file
    is created and removed: permission bits alone do not say what root, ACLs or a read-only mount allow)."""
    path = Path(os.path.expanduser(str(value))).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={value}: {existing} is a file, not a directory; set {key} to a directory")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path if create else existing, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"{key}={value}: cannot write to {path} ({e.strerror or e}); set {key} to a writable directory{hint}"
        ) from None
    return path


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
