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
