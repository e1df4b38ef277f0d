"""Bad bytes in the user's own files are one DataError naming the file and line, never a traceback from the JSON
decoder or `datasets`; a JSON array file is recognised even when it starts with whitespace."""

from __future__ import annotations

import pytest

from llm.data.rows import LocalRows
from llm.data.sources import FileCorpus
from llm.errors import DataError


@pytest.mark.parametrize(
    "name,content,column",
    [
        ("corpus.txt", b"fine\n\xff\xfe latin-1 here\n", 1),
        ("corpus.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', 14),
        ("corpus.json", b'[{"text": "fine"},\n {"text": "caf\xe9"}]', 15),
    ],
)
def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path, name, content, column):
    path = tmp_path / name
    path.write_bytes(content)
    message = f"{path}:2: not UTF-8 text (byte 0x{content.splitlines()[1][column - 1]:02x} at column {column})"
    with pytest.raises(DataError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        FileCorpus(str(path)).load()
    if name.endswith(".txt"):  # what tokenizing reads, block by block, says the same
        with pytest.raises(DataError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            FileCorpus(str(path)).text_lines()
    else:
        with pytest.raises(DataError, match=f"^{path}:2: not UTF-8 text"):
            list(LocalRows(str(path)).rows())


def test_a_json_array_may_start_with_whitespace(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('\n  \n[{"text": "hello", "prompt": "p", "response": "r"}, {"text": "again"}]')
    assert list(FileCorpus(str(path)).load()["text"]) == ["hello", "again"]
    assert [where for where, _ in LocalRows(str(path)).rows()] == [f"{path}:item 1", f"{path}:item 2"]
