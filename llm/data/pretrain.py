"""Pretraining data: tokenize a corpus once, pack it into one contiguous token array on disk, serve windows.

Preparation (`PretrainData.prepare`): batched `datasets.map` over several processes tokenizes every document and
appends EOS; each document goes to train or validation by a seeded hash of its index (deterministic, disjoint);
tokens are written to `train.bin` / `val.bin` (uint16 when the vocabulary fits, else uint32) in a cache directory
keyed by a hash of source + tokenizer + settings. A second run finds the directory and skips tokenization.
Serving (`PackedTokens`): sample i is the window tokens[i*T : i*T + T + 1] -> input_ids (first T), labels (last T).
`token_bytes` (bytes of text per token id) lets objectives report bits per byte.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from llm.contract import INPUT_IDS, LABELS
from llm.data.tokenizer import token_byte_lengths, tokenizer_fingerprint
from llm.errors import ConfigError, DataError

FORMAT_VERSION = 1


class PackedTokens(torch.utils.data.Dataset):
    """Non-overlapping windows of seq_len + 1 tokens over a memory-mapped token file."""

    def __init__(self, path: str | Path, seq_len: int, dtype: str):
        self.path, self.seq_len = str(path), seq_len
        self.tokens = np.memmap(self.path, dtype=np.dtype(dtype), mode="r")
        self.num_windows = (len(self.tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_windows:
            raise IndexError(i)
        window = torch.from_numpy(self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].astype(np.int64))
        return {INPUT_IDS: window[:-1], LABELS: window[1:]}

    @staticmethod
    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _tokenize_batch(batch, indices, tokenizer, eos_id: int, val_fraction: float, split_seed: int):
    """datasets.map function: text -> ids + [EOS], and the split of each document from a hash of its index."""
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {
        "ids": [x + [eos_id] for x in ids],
        "is_val": [is_validation_document(i, val_fraction, split_seed) for i in indices],
    }


def _has_text(batch) -> list[bool]:
    return [bool(text and text.strip()) for text in batch["text"]]


def is_validation_document(index: int, val_fraction: float, seed: int) -> bool:
    """Deterministic, order-independent split: a document's index hashed with the seed."""
    return zlib.crc32(f"{seed}:{index}".encode()) % 1_000_000 < val_fraction * 1_000_000


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class PretrainData:
    """Train/validation windows of a corpus for language modelling. Lazy: `prepare()` does the work."""

    def __init__(self, tokenizer, source, seq_len: int, cache_dir: str = "~/.cache/llm", val_fraction: float = 0.05,
                 split_seed: int = 0, num_proc: int | None = None):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"trainer.seq_len={seq_len!r} must be a positive integer")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"task.data.val_fraction={val_fraction!r} must be between 0 and 1")
        self.tokenizer, self.source, self.seq_len = tokenizer, source, seq_len
        self.cache_dir = Path(os.path.expanduser(str(cache_dir)))
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.num_proc = num_proc or min(os.cpu_count() or 1, 8)
        self.train: PackedTokens | None = None
        self.val: PackedTokens | None = None
        self.meta: dict = {}
        self.from_cache = False

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text per token id (special tokens 0): the denominator of bits per byte."""
        return token_byte_lengths(self.tokenizer)

    def cache_key(self) -> str:
        parts = [FORMAT_VERSION, self.source.fingerprint(), tokenizer_fingerprint(self.tokenizer),
                 self.val_fraction, self.split_seed]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]

    def prepare(self) -> "PretrainData":
        path = self.cache_dir / "data" / self.cache_key()
        with _file_lock(path.with_name(path.name + ".lock")):  # one process tokenizes; the others wait and reuse
            self.from_cache = (path / "meta.json").exists()
            if self.from_cache:
                logger.info(f"data: cached tokens from {path}")
            else:
                self._build(path)
        self.meta = json.loads((path / "meta.json").read_text())
        dtype = self.meta["dtype"]
        self.train = PackedTokens(path / "train.bin", self.seq_len, dtype)
        self.val = PackedTokens(path / "val.bin", self.seq_len, dtype)
        for split, ds in (("train", self.train), ("validation", self.val)):
            if len(ds) == 0:
                n = self.meta["num_tokens"]["train" if split == "train" else "val"]
                raise DataError(
                    f"data: the {split} split has {n} tokens, fewer than trainer.seq_len + 1 = {self.seq_len + 1}; "
                    f"use more data, a shorter seq_len, or change data.val_fraction"
                )
        logger.info(
            f"data: {self.meta['num_tokens']['train']:,} train / {self.meta['num_tokens']['val']:,} val tokens "
            f"({self.meta['num_documents']['train']:,}/{self.meta['num_documents']['val']:,} documents) -> "
            f"{len(self.train):,}/{len(self.val):,} windows of {self.seq_len}"
        )
        return self

    def _build(self, path: Path) -> None:
        import datasets

        t0 = time.time()
        logger.info(f"data: tokenizing {self.source.describe()} into {path}")
        ds = self.source.load()
        streaming = isinstance(ds, datasets.IterableDataset)
        if not streaming and len(ds) == 0:
            raise DataError(f"data: {self.source.describe()} has no documents")
        ds = ds.filter(_has_text, batched=True, **({} if streaming else {"desc": "dropping empty documents"}))
        eos = self.tokenizer.eos_token_id
        kwargs = dict(batched=True, with_indices=True, remove_columns=["text"],
                      fn_kwargs=dict(tokenizer=self.tokenizer, eos_id=eos, val_fraction=self.val_fraction,
                                     split_seed=self.split_seed))
        if not streaming:
            num_proc = max(1, min(self.num_proc, len(ds) // 100))
            kwargs.update(num_proc=num_proc if num_proc > 1 else None, desc="tokenizing")
        ds = ds.map(_tokenize_batch, **kwargs)

        dtype = np.uint16 if len(self.tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
        with open(tmp / "train.bin", "wb") as f_train, open(tmp / "val.bin", "wb") as f_val:
            bar = tqdm(total=None if streaming else len(ds), desc="packing", unit="doc", disable=None)
            for batch in ds.iter(batch_size=1000):
                for ids, is_val in zip(batch["ids"], batch["is_val"]):
                    split = "val" if is_val else "train"
                    (f_val if is_val else f_train).write(np.asarray(ids, dtype=dtype).tobytes())
                    counts[split][0] += len(ids)
                    counts[split][1] += 1
                bar.update(len(batch["ids"]))
            bar.close()
        if counts["train"][1] + counts["val"][1] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"data: {self.source.describe()} has no documents")
        if sum(c[0] for c in counts.values()) == sum(c[1] for c in counts.values()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"data: every document of {self.source.describe()} is empty")
        meta = {
            "format_version": FORMAT_VERSION,
            "source": self.source.describe(),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "vocab_size": len(self.tokenizer),
            "dtype": np.dtype(dtype).name,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "num_tokens": {k: v[0] for k, v in counts.items()},
            "num_documents": {k: v[1] for k, v in counts.items()},
            "seconds": round(time.time() - t0, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        logger.info(f"data: tokenized {sum(c[1] for c in counts.values()):,} documents in {meta['seconds']:.1f}s")
