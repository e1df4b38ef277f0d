"""Row sources for post-training data (SFT conversations, preference pairs): local JSONL / JSON / Parquet files
or a hub dataset. Each yields (where, row): `where` names the file and line (or dataset and row) for errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llm.data.hub import hub_call
from llm.data.sources import FileCorpus, first_char, iter_jsonl, utf8_lines
from llm.errors import ConfigError, DataError
from llm.failures import about


class LocalRows:
    """Rows of local files: `.jsonl` (one JSON object per line), `.json` (an array of objects) or `.parquet`."""

    def __init__(self, paths, key: str = "post_data.train.paths"):
        self.files = FileCorpus(paths, key=key).files  # the path/glob checks and one-line errors of the corpus
        self.patterns = paths

    def rows(self):
        count = 0
        for path in self.files():
            suffix = Path(path).suffix.lower()
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                with about(path):  # not Parquet: pyarrow's ArrowInvalid, as one line naming the file
                    table = pq.read_table(path)
                for i, row in enumerate(table.to_pylist(), 1):
                    count += 1
                    yield f"{path}:row {i}", row
            elif suffix == ".json" and first_char(path) == "[":
                try:
                    items = json.loads("".join(line for _, line in utf8_lines(path)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
                for i, row in enumerate(items, 1):
                    count += 1
                    yield f"{path}:item {i}", _check_object(row, f"{path}:item {i}")
            elif suffix in (".jsonl", ".json"):
                for lineno, row in iter_jsonl(path):
                    count += 1
                    yield f"{path}:{lineno}", _check_object(row, f"{path}:{lineno}")
            else:
                raise ConfigError(f"data: {path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
        if count == 0:
            raise DataError(f"data: {self.patterns} contain no rows")

    def describe(self) -> str:
        return f"local files {self.patterns}"


def _check_object(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    return row


class HubRows:
    """Rows of a hub dataset (or a local dataset directory) through `datasets.load_dataset`."""

    def __init__(
        self,
        name: str,
        config_name: str | None = None,
        split: str = "train",
        revision: str | None = None,
        max_rows: int | None = None,
        trust_remote_code: bool = False,
        key: str = "post_data dataset",
    ):
        """`key`: the option an error names (a dataset the hub cannot give)."""
        self.key = key
        if not name:
            raise ConfigError("data name is empty: give a hub dataset name")
        self.name, self.config_name, self.split, self.revision = name, config_name, split, revision
        self.max_rows, self.trust_remote_code = max_rows, trust_remote_code

    def rows(self):
        import datasets

        kwargs = {"revision": self.revision} if self.revision else {}
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        local = os.path.expanduser(self.name)

        def load():
            return datasets.load_dataset(local, self.config_name, split=self.split, **kwargs)

        try:
            ds = load() if os.path.exists(local) else hub_call(self.key, self.name, load)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"data: cannot load dataset {self.name!r} [{self.split}]: {str(e).splitlines()[0]}") from e
        if len(ds) == 0:
            raise DataError(f"data: dataset {self.name!r} [{self.split}] is empty")
        for i, row in enumerate(ds):
            if self.max_rows and i >= self.max_rows:
                return
            yield f"{self.name}[{self.split}] row {i}", row

    def describe(self) -> str:
        return f"hub dataset {self.name} [{self.split}]"
