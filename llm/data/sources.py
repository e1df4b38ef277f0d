"""Text corpora for pretraining and tokenizer training, each loaded through `datasets` with one `text` column.

- `StdlibCorpus`: the Python standard library's own `.py` sources (~10 MB, present on every Python install);
  the default, so that a run needs no download.
- `FileCorpus`: local text / JSONL / Parquet files, with a configurable text field.
- `HubCorpus`: any dataset on the Hugging Face hub (or a local dataset directory), optionally streaming.

Each source has a `fingerprint()` that changes whenever its content may change: it keys the token cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

from llm.errors import ConfigError, DataError

# Folders of the standard library left out of the default corpus: test suites, bundled apps and the
# installed third-party packages (which differ from machine to machine).
STDLIB_SKIP = ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
               "tkinter", "ensurepip", "__pycache__", "unittest", "pydoc_data")


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StdlibCorpus:
    """Every `.py` file of the running Python's standard library (tests and bundled apps excluded), one document
    per file, in sorted path order, up to `max_bytes` of text."""

    def __init__(self, max_bytes: int | None = 12_000_000):
        self.max_bytes = max_bytes
        self.root = Path(sysconfig.get_paths()["stdlib"])

    def files(self) -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP]  # prune: never walk into site-packages
            found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
        out, total = [], 0
        for path in sorted(found):
            size = path.stat().st_size
            if self.max_bytes and total + size > self.max_bytes:
                break
            out.append(path)
            total += size
        if not out:
            raise DataError(f"data: no .py files found in the standard library at {self.root}")
        return out

    def fingerprint(self) -> str:
        listing = [(str(p.relative_to(self.root)), p.stat().st_size) for p in self.files()]
        return _hash("stdlib", sys.version_info[:3], listing)

    def texts(self):
        for path in self.files():
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text

    def load(self):
        import datasets

        texts = list(self.texts())
        return datasets.Dataset.from_dict({"text": texts})

    def describe(self) -> str:
        return f"Python {sys.version_info.major}.{sys.version_info.minor} standard library sources ({self.root})"


class FileCorpus:
    """Local files. `paths` is a path, a glob, or a list of them; `format` is text|json|parquet, or auto (from the
    extension: .txt/.md -> text, .json/.jsonl -> json, .parquet -> parquet). JSON/Parquet take `text_field`."""

    FORMATS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

    def __init__(self, paths, format: str = "auto", text_field: str = "text"):
        if paths is None or paths == "" or paths == []:
            raise ConfigError("data.paths is empty: give one or more files (e.g. data.paths=[corpus.txt])")
        self.patterns = [str(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else list(paths))]
        self.format, self.text_field = format, text_field
        if format not in ("auto", "text", "json", "parquet"):
            raise ConfigError(f"data.format={format!r} is not allowed; choose one of ['auto', 'json', 'parquet', 'text']")

    def files(self) -> list[str]:
        out = []
        for pattern in self.patterns:
            pattern = os.path.expanduser(pattern)
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches:
                raise DataError(f"data.paths: no file matches {pattern!r}")
            for path in matches:
                if not os.path.isfile(path):
                    raise DataError(f"data.paths: file not found: {path}")
                if not os.access(path, os.R_OK):
                    raise DataError(f"data.paths: file is not readable: {path}")
                if os.path.getsize(path) == 0:
                    raise DataError(f"data.paths: file is empty: {path}")
                out.append(os.path.abspath(path))
        return out

    def _format(self, files: list[str]) -> str:
        if self.format != "auto":
            return self.format
        kinds = {self.FORMATS.get(Path(f).suffix.lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ConfigError(
                f"data.format=auto cannot tell the format of {files}; set data.format to text, json or parquet"
            )
        return kinds.pop()

    def fingerprint(self) -> str:
        files = self.files()
        stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
        return _hash("files", stats, self._format(files), self.text_field)

    def load(self):
        import datasets

        files = self.files()
        fmt = self._format(files)
        if fmt == "json":
            _check_jsonl(files, self.text_field)
        elif fmt == "text":
            for path in files:
                for _ in utf8_lines(path):  # datasets' own message names neither file nor line
                    pass
        try:
            ds = datasets.load_dataset(fmt, data_files=files, split="train")
        except Exception as e:  # datasets raises many types for unreadable input
            raise DataError(f"data.paths: cannot read {files} as {fmt}: {str(e).splitlines()[0]}") from e
        if self.text_field not in ds.column_names:
            raise DataError(f"data.text_field={self.text_field!r} is not a column of {files}; columns: {ds.column_names}")
        if self.text_field != "text":
            ds = ds.rename_column(self.text_field, "text") if "text" not in ds.column_names else \
                ds.remove_columns("text").rename_column(self.text_field, "text")
        return ds.select_columns(["text"])

    def describe(self) -> str:
        return f"local files {self.patterns}"


def first_char(path: str) -> str:
    """The first character of a file that is not whitespace ('' for none): '[' marks a JSON array file."""
    with open(path, "rb") as f:
        return f.read(1 << 16).lstrip()[:1].decode("ascii", errors="replace")


def utf8_lines(path: str):
    """(line number, text) of every line of a file; bytes that are not UTF-8 are a DataError naming file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def iter_jsonl(path: str):
    """(line number, parsed row) for every non-blank line of a JSONL file; a malformed line is a DataError naming
    the file and line (datasets' own message has neither)."""
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _check_jsonl(files: list[str], field: str) -> None:
    """Fail on the first malformed JSONL row with its file and line number (datasets' own message has neither)."""
    for path in files:
        if path.endswith(".json") and first_char(path) == "[":  # a JSON array file: datasets reads it
            for _ in utf8_lines(path):  # but its bytes are checked here, so an error names the line
                pass
            continue
        for lineno, row in iter_jsonl(path):
            if not isinstance(row, dict) or field not in row:
                raise DataError(f"{path}:{lineno}: missing field {field!r}")
            if not isinstance(row[field], str):
                raise DataError(f"{path}:{lineno}: field {field!r} must be a string")


class HubCorpus:
    """A dataset from the Hugging Face hub (or a local dataset directory/script path) via `datasets.load_dataset`.
    With `streaming: true` nothing is downloaded up front; cap the size with `max_documents`."""

    def __init__(self, name: str, config_name: str | None = None, split: str = "train", text_field: str = "text",
                 streaming: bool = False, max_documents: int | None = None, revision: str | None = None,
                 trust_remote_code: bool = False):
        if not name:
            raise ConfigError("data.name is empty: give a hub dataset name such as 'roneneldan/TinyStories'")
        self.name, self.config_name, self.split, self.text_field = name, config_name, split, text_field
        self.streaming, self.max_documents, self.revision = streaming, max_documents, revision
        self.trust_remote_code = trust_remote_code

    def fingerprint(self) -> str:
        return _hash("hub", self.name, self.config_name, self.split, self.text_field, self.max_documents, self.revision)

    def load(self):
        import datasets

        kwargs = {"revision": self.revision} if self.revision else {}
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        try:
            ds = datasets.load_dataset(self.name, self.config_name, split=self.split, streaming=self.streaming, **kwargs)
        except Exception as e:
            raise DataError(f"data.name={self.name!r}: cannot load dataset: {str(e).splitlines()[0]}") from e
        columns = ds.column_names
        if columns is not None and self.text_field not in columns:
            raise DataError(f"data.text_field={self.text_field!r} is not a column of {self.name}; columns: {columns}")
        if self.max_documents:
            ds = ds.take(self.max_documents) if self.streaming else ds.select(range(min(self.max_documents, len(ds))))
        if self.text_field != "text":
            ds = ds.rename_column(self.text_field, "text")
        return ds.select_columns(["text"])

    def describe(self) -> str:
        return f"hub dataset {self.name}" + (f"/{self.config_name}" if self.config_name else "") + f" [{self.split}]"
