"""Writing files whole or not at all: the content goes to a temporary name beside the target, then is renamed over
it (a rename within a dir is atomic), so a kill or a full disk leaves the old file (or none) and never half of a
new one. The one helper every writer of the project's files uses."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a dir's entries (a rename into it, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, content: str | bytes, encoding: str | None = None) -> Path:
    """`content` as the file `path`, written to `<name>.tmp` and renamed over it; a failed write removes the
    temporary file and leaves `path` as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding=encoding)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, suffix: str = ".tmp", fsync: bool = False) -> Iterator[Path]:
    """A dir written whole: the block fills the temporary dir `<name><suffix>` it is given (made empty), which then
    replaces `path` (an existing `path` is removed first); when the block fails the temporary dir is removed and
    `path` is left as it was. `fsync`: the parent's entry flushed after the rename."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        fsync_dir(path.parent)
