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
    existing = next(p for p in (path, *path.parents) if os.path.exists(p))  # (False for a name too long)
    if not existing.is_dir():
        raise ConfigError(f"{key}={value}: {existing} is a file, not a directory; set {key} to a directory")
    check_name_lengths(key, path, existing)
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


def check_name_lengths(key: str, path: Path, existing: Path) -> None:
    """ConfigError naming `key` when a name in `path` is longer than the file system under `existing` allows (255
    bytes on most), or the whole path longer than its limit: found before anything is created, not as an OSError."""
    name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    longest = max(path.parts, key=lambda part: len(part.encode()))
    if len(longest.encode()) > name_max:
        raise ConfigError(
            f"{key}: the name '{longest[:24]}...' has {len(longest.encode())} bytes; this file system allows "
            f"{name_max}: use a shorter name"
        )
    if len(str(path).encode()) + 100 > path_max:  # room for the files a run writes inside it
        raise ConfigError(f"{key}: the path has {len(str(path).encode())} bytes; keep it under {path_max - 100}")


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


def check_cache_dir(key: str, value, hint: str = "") -> bool:
    """A cache dir this run can use: True when it can be written; False (logged) when it exists but cannot be
    written (a read-only shared cache: its complete entries are used as they are). ConfigError naming `key`
    when it is a file, lies under a file, or does not exist and cannot be made."""
    path = Path(os.path.expanduser(str(value))).absolute()
    try:
        check_writable_dir(key, value, hint=hint)
        return True
    except ConfigError:
        if not path.is_dir():
            raise
    logger.info(f"{key}={value} cannot be written: its complete entries are used as they are (read-only)")
    return False


def check_cache_dirs(plain: dict) -> None:
    """The cache dirs this run uses (the BPE's unless init_from brings a tokenizer, the token cache's) are
    directories: else one line naming the key (`cache_dir` when the group takes the top-level one). One that exists
    but cannot be written (a read-only shared cache) is read as it is; only an entry it lacks is an error."""
    used = {"task.data.cache_dir": (plain["task"].get("data") or {}).get("cache_dir")}
    if not plain.get("init_from"):
        used["tokenizer.cache_dir"] = (plain.get("tokenizer") or {}).get("cache_dir")
    for path, key in {v: k for k, v in reversed(used.items()) if v is not None}.items():  # each dir once
        check_cache_dir("cache_dir" if path == plain.get("cache_dir") else key, path, hint=" (or LLM_CACHE_DIR)")


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
