"""Pretraining data: tokenize a corpus once into token shards on disk, serve windows of them.

Preparation (`PretrainData.prepare`): `llm/data/shards.py` tokenizes every document over `num_proc` processes
(text files read straight from disk block by block, `llm/data/textlines.py`; other sources through `datasets`,
streaming hub datasets included), appends EOS, sends each document to train or validation by a
seeded hash of its index (deterministic, disjoint), and writes fixed-size shards (`shard_tokens` tokens, uint16
when the vocabulary fits, else uint32) and their index (`meta.json`) in a cache directory keyed by a hash of
source + tokenizer + split settings. A killed preparation continues where it stopped on the next run; a complete
one is reused without tokenizing; one with a shard missing or of the wrong size is rebuilt (with a warning).
A `Mixture` source (data=mix) is prepared source by source and served as `MixedWindows` (llm/data/mixture.py);
`report(sampler)` gives the realised share of each source.
Serving (`PackedTokens`): sample i is the window tokens[i*T : i*T + T + 1] -> input_ids (first T), labels (last T),
read through memory maps across shard boundaries. With `document_mask`, each window also carries position_ids that
restart after every EOS, and its batch a block-diagonal causal mask (`llm/data/documents.py`): a token attends only
to its own document. Both come from the tokens at serving time, so a cache is the same with or without it.
`token_bytes` (bytes of text per token id) lets objectives report bits per byte.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from llm.contract import ATTN_MASK, INPUT_IDS, LABELS, POSITION_IDS, Data
from llm.data.cache import discard, entry_lock, missing_entry, read_entry_json
from llm.data.documents import block_causal_mask, documents_of, eos_positions
from llm.data.mixture import MixedWindows, Mixture
from llm.data.shards import SPLITS, TokenShards, prepare_shards
from llm.data.sources import FileCorpus
from llm.data.tokenizer import token_byte_lengths, tokenizer_fingerprint
from llm.errors import ConfigError, DataError, check_bool
from llm.utils.files import write_atomic

FORMAT_VERSION = 2  # 2: token shards + index (1: one train.bin / val.bin)
SHARD_TOKENS = 1 << 24  # tokens per shard: 32 MiB as uint16
READ_BATCH = 64  # documents read from the source at a time
CHUNK_BYTES, CHUNK_DOCS = 1 << 20, 8192  # text per task of a tokenizer process (whichever limit comes first)


class PackedTokens(torch.utils.data.Dataset):
    """Non-overlapping windows of seq_len + 1 tokens over a token sequence: `TokenShards`, or one token file.

    `eos_id` (document masking): each window also gets position_ids restarting after every EOS (the EOS ends its
    document), and `collate` turns them into the block-diagonal causal mask of the batch."""

    def __init__(
        self, tokens: TokenShards | str | Path, seq_len: int, dtype: str = "uint16", eos_id: int | None = None
    ):
        self.seq_len, self.eos_id = seq_len, eos_id
        self.tokens = tokens if isinstance(tokens, TokenShards) else TokenShards([Path(tokens)], dtype)
        self.num_windows = max(0, (len(self.tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_windows:
            raise IndexError(i)
        window = torch.from_numpy(self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].astype(np.int64))
        item = {INPUT_IDS: window[:-1], LABELS: window[1:]}
        if self.eos_id is not None:
            item[POSITION_IDS] = eos_positions(item[INPUT_IDS], self.eos_id)  # [T]
        return item

    @staticmethod
    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        if POSITION_IDS in batch:  # document masking: attention within each document only
            batch[ATTN_MASK] = block_causal_mask(documents_of(batch[POSITION_IDS]))  # [B, 1, T, T]
        return batch


class PretrainData(Data):
    """Train/validation windows of a corpus for language modelling. Lazy: `prepare()` does the work."""

    def __init__(
        self,
        tokenizer,
        source,
        seq_len: int,
        cache_dir: str = "~/.cache/llm",
        val_fraction: float = 0.05,
        split_seed: int = 0,
        num_proc: int | None = None,
        shard_tokens: int = SHARD_TOKENS,
        document_mask: bool = False,
    ):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"trainer.seq_len={seq_len!r} must be a positive integer")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"task.data.val_fraction={val_fraction!r} must be between 0 and 1")
        self.tokenizer, self.source, self.seq_len = tokenizer, source, seq_len
        self.cache_dir = Path(os.path.expanduser(str(cache_dir)))
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.num_proc = num_proc or min(os.cpu_count() or 1, 8)
        if not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ConfigError(f"task.data.shard_tokens={shard_tokens!r} must be a positive integer")
        self.shard_tokens = shard_tokens  # the layout of the cache, not its content: not part of the key
        self.document_mask = check_bool("task.data.document_mask", document_mask)  # serving only: not in the key
        self.train: PackedTokens | None = None
        self.val: PackedTokens | None = None
        self.meta: dict = {}
        self.from_cache = False

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text per token id (special tokens 0): the denominator of bits per byte."""
        return token_byte_lengths(self.tokenizer)

    def cache_key(self) -> str:
        parts = [
            FORMAT_VERSION,
            self.source.fingerprint(),
            tokenizer_fingerprint(self.tokenizer),
            self.val_fraction,
            self.split_seed,
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]

    def prepare(self) -> PretrainData:
        if isinstance(self.source, Mixture):
            return self._prepare_mixture()
        path = self.cache_dir / "data" / self.cache_key()
        with entry_lock(path.with_name(path.name + ".lock")) as writable:  # one process tokenizes; others reuse
            self.meta = self._complete_meta(path)
            self.from_cache = self.meta is not None
            if self.from_cache:
                logger.info(f"data: cached tokens from {path}")
            elif not writable:  # a read-only shared cache that lacks this corpus
                raise missing_entry("data", path)
            else:
                self.meta = self._build(path)
        dtype = self.meta["dtype"]
        shards = {s: TokenShards([path / x["file"] for x in self.meta["shards"][s]], dtype) for s in SPLITS}
        eos_id = self.tokenizer.eos_token_id if self.document_mask else None
        self.train = PackedTokens(shards["train"], self.seq_len, eos_id=eos_id)
        self.val = PackedTokens(shards["val"], self.seq_len, eos_id=eos_id)
        for split, ds in (("train", self.train), ("validation", self.val)):
            if len(ds) == 0:
                n = self.meta["num_tokens"]["train" if split == "train" else "val"]
                raise DataError(
                    f"data: the {split} split has {n} tokens, fewer than trainer.seq_len + 1 = {self.seq_len + 1}; "
                    f"use more data, a shorter seq_len, or change data.val_fraction"
                )
        logger.info(
            f"data: {self.meta['num_tokens']['train']:,} train / {self.meta['num_tokens']['val']:,} val tokens "
            f"({self.meta['num_documents']['train']:,}/{self.meta['num_documents']['val']:,} documents, "
            f"{sum(len(v) for v in self.meta['shards'].values())} shard(s)) -> "
            f"{len(self.train):,}/{len(self.val):,} windows of {self.seq_len}"
        )
        return self

    def _prepare_mixture(self) -> PretrainData:
        """Each source prepared (and cached) on its own, then their windows laid out by weight."""
        prepared = []
        for part in self.source.parts:
            one = PretrainData(
                self.tokenizer,
                part.corpus,
                self.seq_len,
                str(self.cache_dir),
                self.val_fraction,
                self.split_seed,
                self.num_proc,
                self.shard_tokens,
                self.document_mask,
            )
            try:
                prepared.append(one.prepare())
            except DataError as e:
                raise DataError(f"data.sources.{part.name}: {str(e).removeprefix('data: ')}") from None
        parts, shares = self.source.parts, self.source.shares
        limits = [None if p.max_tokens is None else int(p.max_tokens) // self.seq_len for p in parts]
        self.train = MixedWindows(
            [(p.name, d.train, s, n, p.epochs) for p, d, s, n in zip(parts, prepared, shares, limits)],
            self.source.seed,
            "train",
        )
        self.val = MixedWindows(
            [(p.name, d.val, s, None, 1) for p, d, s in zip(parts, prepared, shares)], self.source.seed, "val"
        )
        self.from_cache = all(d.from_cache for d in prepared)
        self.meta = {
            "mixture": {p.name: d.meta for p, d in zip(parts, prepared)},
            "num_tokens": {s: len(ds) * self.seq_len for s, ds in (("train", self.train), ("val", self.val))},
        }
        logger.info(
            f"data: mixture of {len(self.train):,} train windows: {self.train.describe()}; "
            f"{len(self.val):,} val windows: {self.val.describe()}"
        )
        return self

    def report(self, sampler) -> dict:
        """What the run consumed, for the log and results.json: a mixture's realised share of each source."""
        if not isinstance(self.train, MixedWindows):
            return {}
        return {f"mix/{name}": share for name, share in self.train.proportions(sampler.consumed()).items()}

    @staticmethod
    def _complete_meta(path: Path) -> dict | None:
        """The index of a complete cached corpus; None when there is none. A corpus whose meta.json does not parse
        or lacks the index, or with a shard missing or of the wrong size, is removed (and so rebuilt, with a
        warning naming it), never used in part."""
        meta_path = path / "meta.json"
        if not meta_path.exists():
            return None
        meta = read_entry_json(meta_path, "data")  # None (after a warning) when it does not parse
        if meta is None:
            shutil.rmtree(path, ignore_errors=True)
            return None
        try:
            itemsize = np.dtype(meta["dtype"]).itemsize
            shards = [x for split in SPLITS for x in meta["shards"][split]]
            expected = {path / x["file"]: int(x["tokens"]) * itemsize for x in shards}
            if not isinstance(meta["num_tokens"], dict) or not isinstance(meta["num_documents"], dict):
                raise TypeError("num_tokens")
        except (TypeError, KeyError, ValueError):
            discard(path, "data", f"has an unreadable index ({meta_path})")
            return None
        for file, size in expected.items():
            if not file.is_file() or file.stat().st_size != size:
                discard(path, "data", f"is damaged: shard {file} is missing or not {size:,} bytes")
                return None
        return meta

    @staticmethod
    def _chunks(ds, streaming: bool):
        """chunks_from(start) for prepare_shards: (first index, texts) of about CHUNK_BYTES of text (or
        CHUNK_DOCS documents) each, from document `start` on."""

        def chunks_from(start: int):
            part = (ds.skip(start) if streaming else ds.select(range(start, len(ds)))) if start else ds
            texts, size = [], 0
            for batch in part.iter(batch_size=READ_BATCH):
                texts += batch["text"]
                size += sum(len(t or "") for t in batch["text"])
                if size >= CHUNK_BYTES or len(texts) >= CHUNK_DOCS:
                    yield start, texts
                    start, texts, size = start + len(texts), [], 0
            if texts:
                yield start, texts

        return chunks_from

    def _build(self, path: Path) -> dict:
        resuming = (path / "progress.json").exists()
        logger.info(
            f"data: {'continuing to tokenize' if resuming else 'tokenizing'} {self.source.describe()} "
            f"into {path} ({self.num_proc} process(es))"
        )
        lines = self.source.text_lines() if isinstance(self.source, FileCorpus) else None
        if lines is not None:  # local text files: read block by block, no Arrow copy (llm/data/textlines.py)
            total = len(lines)
            chunks_from = functools.partial(lines.chunks, chunk_bytes=CHUNK_BYTES, chunk_docs=CHUNK_DOCS)
        else:
            import datasets  # here only: importing it costs most of a second and ~100 MB in every tokenizer process

            ds = self.source.load()
            streaming = isinstance(ds, datasets.IterableDataset)
            total = None if streaming else len(ds)
            chunks_from = self._chunks(ds, streaming)
        if total == 0:
            raise DataError(f"data: {self.source.describe()} has no documents")
        dtype = np.dtype(np.uint16 if len(self.tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32).name
        settings = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
        }
        num_proc = 1 if total is not None and total < 100 else self.num_proc  # a tiny corpus: no processes
        done = prepare_shards(
            path,
            chunks_from,
            self.tokenizer,
            settings,
            num_proc,
            self.shard_tokens,
            total_documents=total or getattr(self.source, "max_documents", None),
        )
        documents, tokens = sum(done["num_documents"].values()), sum(done["num_tokens"].values())
        if documents == 0 or tokens == documents:  # nothing, or nothing but EOS
            shutil.rmtree(path, ignore_errors=True)
            raise DataError(
                f"data: {self.source.describe()} has no documents"
                if documents == 0
                else f"data: every document of {self.source.describe()} is empty"
            )
        meta = {**settings, "source": self.source.describe(), "vocab_size": len(self.tokenizer), **done}
        write_atomic(path / "meta.json", json.dumps(meta, indent=1))  # last: marks the corpus complete
        (path / "progress.json").unlink()
        logger.info(
            f"data: tokenized {documents:,} documents, {tokens:,} tokens in {done['seconds']:.1f}s "
            f"({done['tokens_per_s']:,} tokens/s)"
        )
        return meta
