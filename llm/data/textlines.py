"""The documents of local text files (one per line), read straight from disk in blocks for tokenizing.

They are the rows `datasets`' `text` loader gives (universal newlines: "\\n", "\\r\\n" and "\\r" end a line; the
line break is dropped; each file's last line counts with or without one), without its Arrow copy of the corpus:
no conversion pass before tokenizing, no second copy on disk, and memory of one block whatever the corpus size
(a memory map of the Arrow file would grow the process's RSS with the corpus as it is read).
"""

from __future__ import annotations

from llm.errors import DataError

BLOCK_BYTES = 1 << 20  # bytes read at a time (then up to the end of that line)


def not_utf8(path: str, lineno: int, line: bytes, position: int) -> DataError:
    """The error for a line of a file whose bytes are not UTF-8 (position: of the first bad byte in the line)."""
    return DataError(
        f"{path}:{lineno}: not UTF-8 text (byte {line[position]:#04x} at column {position + 1}); "
        f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _blocks(path: str):
    """(line number of its first line, bytes) of consecutive blocks of whole lines of a file."""
    lineno = 1
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            if not block.endswith(b"\n"):
                block += f.readline()  # finish the line (a "\r\n" is never cut in two)
            yield lineno, block
            lineno += block.count(b"\n")


def _decode(path: str, lineno: int, block: bytes) -> str:
    if block.isascii():  # the common case, checked at memory speed
        return block.decode("ascii")
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as e:  # name the file, line and column, as for a line read on its own
        start = block.rfind(b"\n", 0, e.start) + 1
        end = block.find(b"\n", e.start)
        line = block[start : None if end < 0 else end + 1]
        raise not_utf8(path, lineno + block.count(b"\n", 0, e.start), line, e.start - start) from None


def _lines(text: str) -> list[str]:
    """A block's documents: its lines without their line breaks."""
    if "\r" in text:  # universal newlines, as Python's text mode reads them
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if not lines[-1]:  # the break that ends the last line starts no document
        lines.pop()
    return lines


class TextLines:
    """Local text files as one sequence of documents. Construction reads every file once: it checks that the
    bytes are UTF-8 (a `DataError` names file, line and column) and counts the documents (`len()`)."""

    def __init__(self, files: list[str]):
        self.files = list(files)
        self.num_documents = sum(
            self._count(path, lineno, block) for path in self.files for lineno, block in _blocks(path)
        )

    @staticmethod
    def _count(path: str, lineno: int, block: bytes) -> int:
        text = _decode(path, lineno, block)
        if "\r" in text:
            return len(_lines(text))
        return text.count("\n") + (not text.endswith("\n"))

    def __len__(self) -> int:
        return self.num_documents

    def _documents(self, start: int):
        """Lists of consecutive documents (a block's worth) from document `start` on."""
        index = 0
        for path in self.files:
            for lineno, block in _blocks(path):
                if index < start:  # a block wholly before start is counted, not split
                    n = self._count(path, lineno, block)
                    if index + n <= start:
                        index += n
                        continue
                lines = _lines(_decode(path, lineno, block))
                if index < start:
                    lines = lines[start - index :]
                    index = start
                index += len(lines)
                if lines:
                    yield lines

    def chunks(self, start: int, chunk_bytes: int, chunk_docs: int):
        """(first index, texts) chunks from document `start` on, each of chunk_docs documents or about chunk_bytes
        characters of text, whichever comes first (the last may be shorter)."""
        texts, size = [], 0
        for lines in self._documents(start):
            texts += lines
            size += sum(map(len, lines))
            while texts and (len(texts) >= chunk_docs or size >= chunk_bytes):
                n = min(len(texts), chunk_docs)
                yield start, texts[:n]
                start, texts = start + n, texts[n:]
                size = sum(map(len, texts))
        if texts:
            yield start, texts
