"""Token shards: a preparation killed mid-way and run again gives the shards of an uninterrupted one; windows and
the resumable sampler are exact across shard boundaries; a damaged cache is rebuilt, never used in part."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import llm.data.pretrain as pretrain_mod
from llm.data import FileCorpus, PretrainData, ResumableSampler, train_bpe
from llm.data.shards import KILL_AFTER_ENV
from tests.conftest import ROOT

pytestmark = pytest.mark.xdist_group("shards")  # one worker trains the module's tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
SHARD = 97  # tokens per shard: tiny, so documents and windows cross many boundaries


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) for _ in range(400)]
    lines[7] = lines[300] = "   "  # empty documents are dropped, their index still counts
    (tmp / "docs.txt").write_text("\n".join(lines) + "\n")
    source = FileCorpus(str(tmp / "docs.txt"))
    tokenizer = train_bpe(source, vocab_size=300, cache_dir=str(tmp / "tok"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    return tmp, source, tokenizer


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "meta.json"}


def _meta(path):
    meta = json.loads((path / "meta.json").read_text())
    return {k: v for k, v in meta.items() if k not in ("seconds", "tokens_per_s")}


def test_killed_preparation_continues_to_the_same_shards(corpus, tmp_path, monkeypatch):
    tmp, source, tokenizer = corpus
    monkeypatch.setattr(pretrain_mod, "CHUNK_DOCS", 50)  # 8 chunks
    whole = PretrainData(
        tokenizer, source, seq_len=16, cache_dir=str(tmp_path / "a"), num_proc=2, shard_tokens=SHARD
    ).prepare()
    path = tmp_path / "a" / "data" / whole.cache_key()
    assert len(whole.meta["shards"]["train"]) > 10 and not (path / "progress.json").exists()
    # the same preparation in a process killed (SIGKILL) after 3 chunks, between writing and recording them
    script = (
        f"import llm.data.pretrain as m; from llm.data import FileCorpus, PretrainData, load_pretrained; "
        f"m.CHUNK_DOCS = 50; PretrainData(load_pretrained({str(tmp / 'tokenizer')!r}), "
        f"FileCorpus({str(tmp / 'docs.txt')!r}), seq_len=16, cache_dir={str(tmp_path / 'b')!r}, num_proc=2, "
        f"shard_tokens={SHARD}).prepare()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**__import__("os").environ, KILL_AFTER_ENV: "3"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    killed = tmp_path / "b" / "data" / whole.cache_key()
    progress = json.loads((killed / "progress.json").read_text())
    assert 0 < progress["next_document"] < 400 and not (killed / "meta.json").exists()
    monkeypatch.setattr(pretrain_mod, "CHUNK_DOCS", 70)  # other chunks, one process: the same shards
    again = PretrainData(
        tokenizer, source, seq_len=16, cache_dir=str(tmp_path / "b"), num_proc=1, shard_tokens=SHARD
    ).prepare()
    assert not again.from_cache
    assert _files(killed) == _files(path) and _meta(killed) == _meta(path)
    assert again.meta["num_documents"]["train"] + again.meta["num_documents"]["val"] == 398


def test_windows_and_resume_are_exact_across_shard_boundaries(corpus, tmp_path):
    tmp, source, tokenizer = corpus
    one = PretrainData(tokenizer, source, seq_len=16, cache_dir=str(tmp_path / "one"), num_proc=1).prepare()
    many = PretrainData(
        tokenizer, source, seq_len=16, cache_dir=str(tmp_path / "many"), num_proc=1, shard_tokens=SHARD
    ).prepare()
    assert len(one.meta["shards"]["train"]) == 1 and len(many.meta["shards"]["train"]) > 10
    assert np.array_equal(np.asarray(one.train.tokens), np.asarray(many.train.tokens))
    assert len(one.train) == len(many.train) and len(one.val) == len(many.val)
    for i in range(len(many.train)):  # every window, including the ones that straddle two shards
        assert all(np.array_equal(one.train[i][k], many.train[i][k]) for k in ("input_ids", "labels"))
    assert sum(x["documents"] for x in many.meta["shards"]["train"]) == many.meta["num_documents"]["train"]
    # a sampler saved in the middle and restored continues with exactly the same windows
    full = ResumableSampler(len(many.train), batch_size=4, seed=1)
    expected = [[many.train[i]["input_ids"] for i in full.next_indices()] for _ in range(40)]
    first = ResumableSampler(len(many.train), batch_size=4, seed=1)
    for _ in range(17):
        first.next_indices()
    resumed = ResumableSampler(len(many.train), batch_size=4, seed=1)
    resumed.load_state_dict(first.state_dict())
    for step in range(17, 40):
        got = [many.train[i]["input_ids"] for i in resumed.next_indices()]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected[step]))


def test_a_deleted_shard_is_rebuilt_not_used_in_part(corpus, tmp_path):
    tmp, source, tokenizer = corpus
    kwargs = dict(seq_len=16, cache_dir=str(tmp_path / "c"), num_proc=1, shard_tokens=SHARD)
    first = PretrainData(tokenizer, source, **kwargs).prepare()
    path = tmp_path / "c" / "data" / first.cache_key()
    before = _files(path)
    (path / first.meta["shards"]["train"][3]["file"]).unlink()
    again = PretrainData(tokenizer, source, **kwargs).prepare()
    assert not again.from_cache and _files(path) == before
    assert len(again.train) == len(first.train)


def test_a_streaming_dataset_is_tokenized_in_parallel_like_a_local_one(corpus, tmp_path):
    from llm.data import HubCorpus

    tmp, _, tokenizer = corpus
    (tmp_path / "ds").mkdir()
    rows = [{"content": " ".join(WORDS[i % 7 : i % 7 + 5 + i % 11])} for i in range(300)]
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kwargs = dict(seq_len=8, num_proc=2, shard_tokens=SHARD)
    local = PretrainData(
        tokenizer, HubCorpus(str(tmp_path / "ds"), text_field="content"), cache_dir=str(tmp_path / "l"), **kwargs
    ).prepare()
    streamed = PretrainData(
        tokenizer,
        HubCorpus(str(tmp_path / "ds"), text_field="content", streaming=True),
        cache_dir=str(tmp_path / "s"),
        **kwargs,
    ).prepare()
    assert np.array_equal(np.asarray(local.train.tokens), np.asarray(streamed.train.tokens))
    assert streamed.meta["num_documents"] == local.meta["num_documents"]
    assert sum(streamed.meta["num_documents"].values()) == 300


def test_text_files_read_block_by_block_are_the_rows_of_datasets_text_loader(tmp_path, monkeypatch):
    """Tokenizing reads .txt files itself (no Arrow copy): the same documents as datasets' `text` loader, whatever
    the block size and starting document: universal newlines, a last line without a break, several files."""
    import llm.data.textlines as textlines

    rng = np.random.default_rng(3)
    pieces = [
        " ".join(rng.choice(WORDS + ["é", "漢字", "\x0b", "\u2028", "  "], size=int(rng.integers(0, 9))))
        + str(rng.choice(["\n", "\n", "\r\n", "\r"]))
        for _ in range(300)
    ]
    (tmp_path / "a.txt").write_bytes("".join(pieces).encode())
    (tmp_path / "b.txt").write_bytes(b"\n\nlast\r\r\nno break at the end")
    source = FileCorpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    expected = list(source.load()["text"])
    for block in (1 << 20, 64, 1):
        monkeypatch.setattr(textlines, "BLOCK_BYTES", block)
        lines = source.text_lines()
        assert len(lines) == len(expected)
        for start in (0, 1, 150, len(expected) - 1, len(expected)):
            chunks = list(lines.chunks(start, chunk_bytes=200, chunk_docs=7))
            assert [t for _, texts in chunks for t in texts] == expected[start:]
            assert [first for first, _ in chunks] == list(np.cumsum([start] + [len(t) for _, t in chunks])[:-1])
