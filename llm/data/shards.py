"""Tokenize a corpus once into fixed-size token shards, in parallel and resumably; read them back as one sequence.

Cache layout (format 2), in the corpus's fingerprinted dir `<cache_dir>/data/<key>/`:
- `train_000000.bin`, `train_000001.bin`, ..., `val_000000.bin`, ...: raw token ids (uint16 when the vocabulary
  fits, else uint32). Every shard holds exactly `shard_tokens` tokens but the last of its split; the documents of
  a split follow each other in corpus order, each ended by EOS, and run on from one shard into the next.
- `meta.json`, written last (its presence marks a complete corpus): dtype, totals and the index: for each split
  the list of its shards with their tokens and the documents that end in them.
- while preparing, `progress.json`: the documents consumed so far, the finished shards, and the length of each
  split's open shard (`<split>_NNNNNN.bin.partial`). A re-run after a kill truncates the open shards to those
  lengths and goes on with the next document, so its shards are identical to an uninterrupted preparation's.

`prepare_shards`: the calling process reads the documents in order and hands chunks of them to `num_proc`
tokenizer processes (at most two chunks per process in flight, so memory is bounded by the chunks, never by the
corpus; the shards are written straight to disk); the results come back in order and are appended to the open
shard of their split. Which split a document goes to is a seeded hash of its index in the corpus, empty
documents included (deterministic, disjoint, independent of chunking and of the number of processes).
`TokenShards`: a split's shards as memory maps behind one read-only sequence; a slice may span shards.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llm.data.cache import read_entry_json
from llm.errors import DataError
from llm.utils.files import write_atomic

SPLITS = ("train", "val")
KILL_AFTER_ENV = "LLM_PREPARE_KILL_AFTER"  # testing aid: SIGKILL this process after that many chunks

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
_worker: dict = {}  # the tokenizer and settings of a tokenizer process (set once by its initializer)


def is_validation_document(index: int, val_fraction: float, seed: int) -> bool:
    """Deterministic, order-independent split: a document's index hashed with the seed."""
    return zlib.crc32(f"{seed}:{index}".encode()) % 1_000_000 < val_fraction * 1_000_000


def shard_name(split: str, number: int) -> str:
    return f"{split}_{number:06d}.bin"


# ---------------------------------------------------------------------------------------------- tokenizing
def _init_worker(tokenizer_json: str, eos_id: int, val_fraction: float, split_seed: int, dtype: str) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: num_proc processes use num_proc cores
    _worker.update(
        tokenizer=Tokenizer.from_str(tokenizer_json),
        eos_id=eos_id,
        val_fraction=val_fraction,
        split_seed=split_seed,
        dtype=np.dtype(dtype),
    )


def _init_pool_worker(*init_args) -> None:
    """A tokenizer process: Ctrl-C is the main process's to handle (it ends the pool); the other signals end this
    process (not the handlers a fork inherits, which would keep it alive when the pool ends it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):  # Linux: end with the main process, even after its kill -9
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _init_worker(*init_args)


def encode_chunk(first_index: int, texts: list) -> dict:
    """A chunk of documents (the first has corpus index `first_index`) -> per split (tokens, end offset of each
    document in them); empty documents are dropped (their index still counts)."""
    w = _worker
    kept = [(first_index + i, t) for i, t in enumerate(texts) if t and t.strip()]
    encodings = w["tokenizer"].encode_batch_fast([t for _, t in kept], add_special_tokens=False)
    flat, lengths = {split: [] for split in SPLITS}, {split: [] for split in SPLITS}
    for (index, _), enc in zip(kept, encodings):
        split = "val" if is_validation_document(index, w["val_fraction"], w["split_seed"]) else "train"
        flat[split] += enc.ids
        flat[split].append(w["eos_id"])
        lengths[split].append(len(enc.ids) + 1)
    return {
        split: (np.array(flat[split], dtype=w["dtype"]), np.cumsum(np.array(lengths[split], dtype=np.int64)))
        for split in SPLITS
    }


def _encoded_chunks(chunks, num_proc: int, init_args: tuple):
    """(number of documents, encode_chunk result) for each (first index, texts) chunk, in order; over num_proc
    processes with at most 2 x num_proc chunks in flight."""
    if num_proc <= 1:
        parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
        _init_worker(*init_args)
        try:
            for first, texts in chunks:
                yield len(texts), encode_chunk(first, texts)
        finally:  # this process's own setting back
            os.environ.pop("TOKENIZERS_PARALLELISM")
            if parallelism is not None:
                os.environ["TOKENIZERS_PARALLELISM"] = parallelism
        return
    context = multiprocessing.get_context("fork")
    try:  # an executor, not a Pool: a process that dies (a signal, the OOM killer) is an error, not a wait forever
        with ProcessPoolExecutor(num_proc, context, initializer=_init_pool_worker, initargs=init_args) as pool:
            pending = collections.deque()
            for first, texts in chunks:
                pending.append((len(texts), pool.submit(encode_chunk, first, texts)))
                if len(pending) >= 2 * num_proc:
                    n, result = pending.popleft()
                    yield n, result.result()
            while pending:
                n, result = pending.popleft()
                yield n, result.result()
    except BrokenProcessPool as e:
        raise DataError(
            "data: a tokenizer process ended abruptly (a signal or out of memory); run again to continue "
            "the preparation where it stopped"
        ) from e


# ---------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Appends the tokens of one split to fixed-size shard files; `state()` is what progress.json keeps of it."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int, state: dict | None = None):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, np.dtype(dtype), shard_tokens
        state = state or {"shards": [], "open_tokens": 0, "open_documents": 0}
        self.shards = list(state["shards"])  # [{"file", "tokens", "documents"}] of the finished shards
        self.open_tokens, self.open_documents = state["open_tokens"], state["open_documents"]
        self.file = None

    def _open(self):
        """The open shard, truncated to what progress.json recorded (a killed run may have written more)."""
        final = self.root / shard_name(self.split, len(self.shards))
        partial = final.with_name(final.name + ".partial")
        if not partial.exists() and final.exists() and self.open_tokens:  # closed after the last progress.json
            final.rename(partial)
        self.file = open(partial, "r+b" if partial.exists() else "wb")
        self.file.truncate(self.open_tokens * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)

    def append(self, tokens: np.ndarray, doc_ends: np.ndarray) -> None:
        """Append tokens, in which documents end at the offsets `doc_ends`, closing every shard that fills up."""
        done = 0
        while done < len(tokens):
            if self.file is None:
                self._open()
            piece = tokens[done : done + self.shard_tokens - self.open_tokens]
            self.file.write(piece.tobytes())
            ended = np.searchsorted(doc_ends, done + len(piece), side="right") - np.searchsorted(
                doc_ends, done, side="right"
            )
            self.open_tokens += len(piece)
            self.open_documents += int(ended)
            done += len(piece)
            if self.open_tokens == self.shard_tokens:
                self._close()

    def _close(self) -> None:
        self.file.close()
        self.file = None
        final = self.root / shard_name(self.split, len(self.shards))
        final.with_name(final.name + ".partial").rename(final)
        self.shards.append({"file": final.name, "tokens": self.open_tokens, "documents": self.open_documents})
        self.open_tokens = self.open_documents = 0

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def finish(self) -> list[dict]:
        """Close the last, shorter shard; the index of the split."""
        if self.open_tokens:
            if self.file is None:
                self._open()
            self._close()
        return self.shards

    def state(self) -> dict:
        return {"shards": self.shards, "open_tokens": self.open_tokens, "open_documents": self.open_documents}


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=1))  # a kill leaves the old or the new file, never half of one


def prepare_shards(
    root: Path,
    chunks_from,
    tokenizer,
    settings: dict,
    num_proc: int,
    shard_tokens: int,
    total_documents: int | None = None,
) -> dict:
    """Tokenize into `root` (resuming a killed preparation found there); returns the index and totals.

    `chunks_from(start)` yields (first index, texts) chunks of the corpus from document `start` on. `settings`
    (dtype, val_fraction, split_seed, ...) must match a found progress.json, else it starts over."""
    root.mkdir(parents=True, exist_ok=True)
    progress_path = root / "progress.json"
    progress = read_entry_json(progress_path, "data") if progress_path.exists() else None  # None: damaged
    if progress is not None and (
        progress.get("settings") != settings or not {"next_document", "shard_tokens", "writers"} <= set(progress)
    ):
        progress = None  # another format or split, or an unreadable record: start over
    start = progress["next_document"] if progress else 0
    shard_tokens = progress["shard_tokens"] if progress else shard_tokens
    writers = {
        s: ShardWriter(root, s, settings["dtype"], shard_tokens, progress and progress["writers"][s]) for s in SPLITS
    }
    tokens_done = {s: sum(x["tokens"] for x in w.shards) + w.open_tokens for s, w in writers.items()}
    init = (
        tokenizer.backend_tokenizer.to_str(),
        tokenizer.eos_token_id,
        settings["val_fraction"],
        settings["split_seed"],
        settings["dtype"],
    )
    kill_after = int(os.environ.get(KILL_AFTER_ENV, 0))
    t0, new_tokens = time.perf_counter(), 0
    bar = tqdm(total=total_documents, initial=start, desc="tokenizing", unit="doc", dynamic_ncols=True, disable=None)
    for n_chunks, (n, parts) in enumerate(_encoded_chunks(chunks_from(start), num_proc, init), 1):
        for split, (tokens, ends) in parts.items():
            writers[split].append(tokens, ends)
            tokens_done[split] += len(tokens)
            new_tokens += len(tokens)
        start += n
        if kill_after and n_chunks >= kill_after:  # after appending, before recording: the worst moment
            os.kill(os.getpid(), signal.SIGKILL)
        for w in writers.values():
            w.flush()
        _write_json(
            progress_path,
            {
                "settings": settings,
                "shard_tokens": shard_tokens,
                "next_document": start,
                "writers": {s: w.state() for s, w in writers.items()},
            },
        )
        bar.update(n)
        bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):,.0f}", refresh=False)
    bar.close()
    index = {s: w.finish() for s, w in writers.items()}
    seconds = time.perf_counter() - t0
    return {
        "shard_tokens": shard_tokens,
        "shards": index,
        "num_tokens": tokens_done,
        "documents_read": start,
        "num_documents": {s: sum(x["documents"] for x in shards) for s, shards in index.items()},
        "seconds": round(seconds, 2),
        "tokens_per_s": round(new_tokens / max(seconds, 1e-9)),
    }


# ---------------------------------------------------------------------------------------------- reading
class TokenShards:
    """The shards of one split as one read-only token sequence: `len()`, slices `[a:b]` (a view inside a shard,
    a small copy across a boundary). Memory maps: nothing of the corpus is read before it is used."""

    def __init__(self, paths: list[Path], dtype: str):
        self.maps = [np.memmap(p, dtype=np.dtype(dtype), mode="r") for p in paths if os.path.getsize(p)]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])  # offset of each shard; the last is the total
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("TokenShards takes slices")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("TokenShards slices take no step")
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            base = int(self.starts[shard])
            end = min(stop, int(self.starts[shard + 1]))
            pieces.append(self.maps[shard][start - base : end - base])
            start, shard = end, shard + 1
        if not pieces:
            return np.empty(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole split in memory (tests and small corpora only)."""
        whole = np.concatenate(self.maps) if self.maps else np.empty(0, dtype=self.dtype)
        return whole if dtype is None else whole.astype(dtype)
