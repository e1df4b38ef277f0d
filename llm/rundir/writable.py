"""A dir a run must write (the run or sweep dir, a cache dir): checked before any work, one line naming the key."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from llm.errors import ConfigError


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
