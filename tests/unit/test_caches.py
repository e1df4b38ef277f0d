"""Caches heal or name themselves: a damaged tokenizer or token cache entry is rebuilt with a warning naming it,
never used in part; a cache dir that is a file or cannot be written is one line naming the key and the path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from loguru import logger

from llm.data import FileCorpus, PretrainData, train_bpe
from llm.errors import ConfigError
from llm.rundir.writable import check_writable_dir
from tests.conftest import SMALL, run_cli

WORDS = "one two three four five six seven eight nine ten eleven twelve".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caches")
    rng = np.random.default_rng(1)
    (tmp / "docs.txt").write_text("\n".join(" ".join(rng.choice(WORDS, size=12)) for _ in range(200)) + "\n")
    return FileCorpus(str(tmp / "docs.txt"))


@pytest.fixture
def warnings():
    seen = []
    handler = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(handler)


def _tokenizer_dir(cache: str) -> Path:
    return next(p for p in (Path(cache) / "tokenizers").iterdir() if p.is_dir())


@pytest.mark.parametrize(
    "damage", ["truncated tokenizer.json", "garbled tokenizer_config.json", "no tokenizer.json", "not a tokenizer"]
)
def test_a_damaged_tokenizer_cache_is_trained_again(damage, corpus, tmp_path, warnings):
    cache = str(tmp_path / "cache")
    vocab = train_bpe(corpus, vocab_size=280, cache_dir=cache).get_vocab()
    entry = _tokenizer_dir(cache)
    target = entry / ("tokenizer_config.json" if "config" in damage else "tokenizer.json")
    if damage.startswith("truncated"):
        target.write_bytes(target.read_bytes()[:1000])
    elif damage.startswith("garbled"):
        target.write_bytes(b"\x00\xff{garbage")
    elif damage.startswith("no "):
        target.unlink()
    else:
        target.write_text(json.dumps({"version": "1.0"}))  # parses, but is no tokenizer
    again = train_bpe(corpus, vocab_size=280, cache_dir=cache)
    assert again.get_vocab() == vocab
    assert any(str(entry) in w and "rebuilding" in w for w in warnings), warnings
    assert train_bpe(corpus, vocab_size=280, cache_dir=cache).get_vocab() == vocab  # the healed entry is used
    assert sorted(p.name for p in entry.parent.iterdir() if not p.name.endswith(".lock")) == [entry.name]


@pytest.mark.parametrize(
    "damage", ["truncated meta.json", "meta.json without the index", "truncated shard", "garbled progress.json"]
)
def test_a_damaged_token_cache_is_rebuilt_not_used_in_part(damage, corpus, tmp_path, warnings):
    tokenizer = train_bpe(corpus, vocab_size=280, cache_dir=str(tmp_path / "tok"))
    kwargs = dict(seq_len=16, cache_dir=str(tmp_path / "cache"), num_proc=1, shard_tokens=101)
    first = PretrainData(tokenizer, corpus, **kwargs).prepare()
    path = tmp_path / "cache" / "data" / first.cache_key()
    shards = {p.name: p.read_bytes() for p in path.glob("*.bin")}
    tokens = np.array(first.train.tokens)  # a copy: the damage below changes what the memory maps see
    meta = path / "meta.json"
    if damage == "truncated meta.json":
        meta.write_bytes(meta.read_bytes()[:50])
    elif damage == "meta.json without the index":
        meta.write_text(json.dumps({"dtype": "uint16"}))
    elif damage == "truncated shard":
        shard = path / first.meta["shards"]["train"][2]["file"]
        shard.write_bytes(shard.read_bytes()[:60])
    else:  # a preparation that was interrupted, and whose record of progress is garbage
        meta.unlink()
        (path / "progress.json").write_text('{"settings": ')
    again = PretrainData(tokenizer, corpus, **kwargs).prepare()
    assert not again.from_cache and {p.name: p.read_bytes() for p in path.glob("*.bin")} == shards
    assert np.array_equal(np.asarray(again.train.tokens), tokens)
    assert any(str(path) in w and "rebuilding" in w for w in warnings), warnings


def test_a_cache_dir_that_is_a_file_or_not_writable_is_named(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConfigError, match=f"cache_dir={file}/sub: {file} is a file, not a directory"):
        check_writable_dir("cache_dir", f"{file}/sub")
    with pytest.raises(ConfigError, match="cache_dir=/proc/llm-cache: cannot write to /proc/llm-cache"):
        check_writable_dir("cache_dir", "/proc/llm-cache")  # not even root may create a dir there
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this process may write a read-only dir (root)")
        with pytest.raises(ConfigError, match=f"tokenizer.cache_dir={locked}/c: cannot write to {locked}/c"):
            check_writable_dir("tokenizer.cache_dir", f"{locked}/c")
    finally:
        locked.chmod(0o700)


def test_run_py_names_a_cache_dir_that_is_a_file(tmp_path, cache_dir):
    (tmp_path / "cache").write_text("not a dir")
    proc = run_cli([*SMALL, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "cache", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cache_dir={tmp_path / 'cache'}: {tmp_path / 'cache'} "
        f"is a file, not a directory; set cache_dir to a directory"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
