"""Every error that ends a run, as the one line a user can act on: the one place that knows what the libraries'
exceptions mean (OSError by errno, safetensors' SafetensorError, pyarrow's ArrowInvalid, JSON and UTF-8 decoding,
torch's pickle loader, `load_state_dict`'s size mismatch, an allocation that fails).

- `explain(exc, file)`: the project's error (an `LLMError`: one line naming the file or key and what to do) for an
  exception a user or the machine caused; None for one this module does not know (a bug: its traceback matters).
- `about(path)`: a block whose library errors come out as `explain`'s, naming `path` (where a library's message
  does not: safetensors says "header too large", not which file).
- `report(exc, debug)`: the line run.py prints (and its exit code) for any exception escaping a run; the traceback
  goes to train.log (and to the terminal only with debug=true).

Nothing here imports a library: exceptions are told apart by their class names and the errno they carry, so this
module stays a leaf that every room may call.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re

from llm.errors import ConfigError, DataError, LLMError, ResourceError

# errno -> what to do about it (the strerror says what happened)
ADVICE = {
    errno.ENOSPC: "free some space there, or write somewhere else",
    errno.EDQUOT: "free some of your quota, or write somewhere else",
    errno.EFBIG: "a file-size limit (ulimit -f, or the file system's largest file) was reached: raise it or write "
    "somewhere else",
    errno.ENAMETOOLONG: "use a shorter path (a name may have 255 bytes)",
    errno.EROFS: "the file system is mounted read-only: write somewhere else",
    errno.EACCES: "you may not write or read there: fix its permissions, or use another path",
    errno.EPERM: "you may not write or read there: fix its permissions, or use another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory, not a file",
    errno.EIO: "the device reported an I/O error: check the disk",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENOMEM: "not enough memory",
}
OS_ERROR = re.compile(r"(.*?)\s*\(os error (\d+)\)")  # how Rust libraries (safetensors, tokenizers) report errno
ALLOCATION = ("can't allocate memory", "out of memory", "DefaultCPUAllocator", "not enough memory")
PICKLE = ("UnpicklingError", "invalid load key", "PytorchStreamReader", "weights_only")


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def os_errno(exc: BaseException) -> int | None:
    """The errno an exception carries: an OSError's, or the `(os error N)` of a Rust library's message."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = OS_ERROR.search(str(exc))
    return int(found.group(2)) if found else None


def os_problem(exc: BaseException, file=None) -> str | None:
    """`<file>: <what happened>: <what to do>` for an exception that carries an errno (`file`: the file to name
    when the exception does not; False: none); None for one that carries no errno."""
    code = os_errno(exc)
    if code is None:
        return None
    file = getattr(exc, "filename", None) if file is None else file  # False: no file named
    strerror = os.strerror(code)
    advice = ADVICE.get(code)
    where = f"{file}: " if file else ""
    if code == errno.ENAMETOOLONG and file:
        longest = max(str(file).split(os.sep), key=len)
        advice = f"a name of {len(longest.encode())} bytes ('{longest[:20]}...'); {advice}"
    return f"{where}{strerror}" + (f": {advice}" if advice else "")


def explain(exc: BaseException, file=None) -> LLMError | None:
    """The project's one-line error for `exc` (naming `file` when given), or None when it is not a known kind."""
    if isinstance(exc, LLMError):
        return exc
    names, text = _names(exc), _first_line(exc)
    where = f"{file}: " if file else ""
    problem = os_problem(exc, file)
    if problem is not None and "MemoryError" not in names:
        return ResourceError(problem)
    if "MemoryError" in names or "OutOfMemoryError" in names or any(a in str(exc) for a in ALLOCATION):
        size = re.search(r"allocate (\d+) bytes", str(exc))
        need = f" ({int(size.group(1)) / 1e9:.1f} GB asked for)" if size else ""
        return ResourceError(f"{where}out of memory{need}: use a smaller model, batch or sequence, or more memory")
    if "SafetensorError" in names:
        return DataError(f"{where}not a readable safetensors file ({text}): it is damaged or of another format")
    if any(n.startswith("Arrow") for n in names) or type(exc).__module__.startswith("pyarrow"):
        return DataError(f"{where}cannot be read ({text})")
    if "UnicodeDecodeError" in names:
        return DataError(f"{where}not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})")
    if "JSONDecodeError" in names:
        return DataError(f"{where}not valid JSON ({exc.msg} at line {exc.lineno})")
    if any(p in str(exc) or p in names for p in PICKLE):
        return DataError(f"{where}not a file this project loads ({text}); pickles are never loaded (they can run code)")
    mismatch = re.search(r"size mismatch for ([^:]+): (.*)", str(exc))  # load_state_dict's
    if mismatch:
        shapes = re.findall(r"torch.Size\((\[[^\]]*\])\)", mismatch.group(2))
        what = f"{shapes[0]} in the file, {shapes[1]} in the model" if len(shapes) == 2 else mismatch.group(2)
        return ConfigError(
            f"{where}the weights do not fit the model its config describes: {mismatch.group(1)} is {what}"
        )
    return None


@contextlib.contextmanager
def about(path, prefix: str = ""):
    """Inside the block, a library's exception that `explain` knows is raised as its LLMError naming `path`
    (after `prefix`, e.g. 'resume: '); the original stays its cause (debug=true and train.log show it)."""
    try:
        yield
    except LLMError:
        raise
    except Exception as e:
        error = explain(e, path)
        if error is None:
            raise
        raise type(error)(f"{prefix}{error}") from e


def report(exc: BaseException, log_file=None) -> str:
    """The one line for an exception that ended a run: `explain`'s when it knows it, else a line naming the
    exception as an unexpected error (a bug) and where its traceback is."""
    error = explain(exc)
    if error is not None:
        return f"error: {error}".splitlines()[0] if not isinstance(exc, LLMError) else f"error: {error}"
    where = f"the traceback is in {log_file}; " if log_file else ""
    return f"error: unexpected {type(exc).__name__}: {_first_line(exc)} ({where}debug=true prints it; please report it)"


def too_big_model(exc: BaseException, model: dict) -> LLMError | None:
    """The one line for a model whose weights cannot be allocated, naming the keys that made it that big (a
    learned position table of model.max_seq_len x model.d_model, or the layers and width)."""
    error = explain(exc)
    if not isinstance(error, ResourceError) or "out of memory" not in str(error):
        return None
    d, seq = model.get("d_model") or 0, model.get("max_seq_len") or 0
    if model.get("pos_emb") == "learned" and seq * d > 10 * (model.get("vocab_size") or 0) * d:
        culprit = f"model.max_seq_len={seq} with learned positions makes a {seq:,} x {d} table"
    else:
        culprit = ", ".join(f"model.{k}={model[k]}" for k in ("n_layer", "d_model", "vocab_size") if k in model)
    need = re.search(r" \(.* asked for\)", str(error))
    return ResourceError(f"model: its weights do not fit in memory{need.group(0) if need else ''}: {culprit}")


@contextlib.contextmanager
def quiet_loggers(prefixes: tuple[str, ...], quiet: bool = True):
    """The standard-library loggers named `prefixes...` silenced in the block (`quiet`): a library that logs an
    error's whole traceback itself (PyTorch's elastic launcher, for a failed worker) when the caller reports it."""
    names = [name for name in logging.root.manager.loggerDict if name.startswith(prefixes)]
    loggers = [logging.getLogger(name) for name in names] if quiet else []
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was
