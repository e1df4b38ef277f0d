"""Data: tokenizer, packing with EOS, cache reuse, disjoint split, sampler resume, clear errors on bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

import llm.data.shards as shards_mod
from llm.data import FileCorpus, PretrainData, ResumableSampler, StdlibCorpus, load_pretrained, train_bpe
from llm.errors import ConfigError, DataError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    docs = [f"doc{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) for i in range(300)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return FileCorpus(str(path), text_field="body"), docs


@pytest.fixture
def tokenizer(corpus, tmp_path):
    return train_bpe(corpus[0], vocab_size=300, cache_dir=str(tmp_path / "cache"))


def test_bpe_tokenizer_roundtrip_and_specials(tokenizer, corpus, tmp_path):
    text = corpus[1][0]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {"<|bos|>", "<|eos|>", "<|pad|>"}
    assert len(tokenizer) == 300
    # cached: a second call loads the same tokenizer; a saved one loads as a pretrained dir
    again = train_bpe(corpus[0], vocab_size=300, cache_dir=str(tmp_path / "cache"))
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    assert load_pretrained(str(tmp_path / "tok"))(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_packing_appends_eos_and_splits_documents_disjointly(tokenizer, corpus, tmp_path):
    source, docs = corpus
    data = PretrainData(
        tokenizer, source, seq_len=16, cache_dir=str(tmp_path / "c"), val_fraction=0.2, num_proc=1
    ).prepare()
    assert data.meta["dtype"] == "uint16"
    eos = tokenizer.eos_token_id
    train = np.asarray(data.train.tokens)
    val = np.asarray(data.val.tokens)
    assert (train == eos).sum() + (val == eos).sum() == len(docs)
    assert train[-1] == eos and val[-1] == eos
    decode = lambda arr: {
        tokenizer.decode(seg.tolist()) for seg in np.split(arr, np.where(arr == eos)[0] + 1) if len(seg)
    }
    train_docs = {d.replace(tokenizer.eos_token, "") for d in decode(train)}
    val_docs = {d.replace(tokenizer.eos_token, "") for d in decode(val)}
    assert train_docs | val_docs == set(docs)
    assert not train_docs & val_docs
    assert 0.1 < len(val_docs) / len(docs) < 0.3
    # windows: T inputs, labels shifted by one, consecutive windows share one boundary token
    item0, item1 = data.train[0], data.train[1]
    assert item0["input_ids"].shape == (16,)
    assert np.array_equal(item0["labels"][:-1], item0["input_ids"][1:])
    assert item0["labels"][-1] == item1["input_ids"][0]
    assert len(data.train) == (len(train) - 1) // 16


def test_second_preparation_does_no_tokenization(tokenizer, corpus, tmp_path, monkeypatch):
    source, _ = corpus
    kwargs = dict(seq_len=16, cache_dir=str(tmp_path / "c"), val_fraction=0.2, num_proc=1)
    first = PretrainData(tokenizer, source, **kwargs).prepare()
    assert not first.from_cache

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(shards_mod, "encode_chunk", boom)
    second = PretrainData(tokenizer, source, **kwargs).prepare()
    assert second.from_cache
    assert np.array_equal(np.asarray(first.train.tokens), np.asarray(second.train.tokens))
    # a different split is a different cache entry (and would tokenize)
    with pytest.raises(AssertionError, match="tokenized again"):
        PretrainData(tokenizer, source, **{**kwargs, "val_fraction": 0.3}).prepare()


def test_stdlib_corpus_is_deterministic_and_skips_tests():
    corpus = StdlibCorpus(max_bytes=300_000)
    files = corpus.files()
    assert files and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    assert corpus.fingerprint() == StdlibCorpus(max_bytes=300_000).fingerprint()
    assert sum(f.stat().st_size for f in files) <= 300_000


def test_stdlib_corpus_leaves_out_generated_tables():
    files = {str(f.relative_to(StdlibCorpus().root)) for f in StdlibCorpus(max_bytes=None).files()}
    everything = {
        str(f.relative_to(StdlibCorpus().root)) for f in StdlibCorpus(max_bytes=None, skip_generated=False).files()
    }
    generated = everything - files
    assert {"encodings/cp437.py", "encodings/latin_1.py"} & everything == {"encodings/cp437.py", "encodings/latin_1.py"}
    assert "encodings/cp437.py" in generated and "stringprep.py" in generated  # codec maps, tool-written tables
    assert {"encodings/latin_1.py", "ast.py", "http/cookiejar.py", "optparse.py"} <= files  # hand-written code stays
    assert all(
        name.startswith("encodings/") or name in {"keyword.py", "token.py", "stringprep.py", "re/_casefix.py"}
        for name in generated
    )


def test_sampler_is_resumable_and_rank_aware():
    full = ResumableSampler(100, batch_size=8, seed=3)
    steps = [full.next_indices() for _ in range(30)]  # crosses epochs (12 steps per epoch)
    resumed = ResumableSampler(100, batch_size=8, seed=3)
    for _ in range(7):
        resumed.next_indices()
    state = resumed.state_dict()
    fresh = ResumableSampler(100, batch_size=8, seed=3)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert [fresh.next_indices() for _ in range(23)] == steps[7:]
    ranks = [ResumableSampler(100, batch_size=8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].next_indices() + ranks[1].next_indices() == steps[0]
    assert len(set(steps[0])) == 8
    epoch0 = [i for s in steps[:12] for i in s]
    assert len(set(epoch0)) == 96  # no sample repeated within an epoch


def test_file_errors_name_the_culprit(tmp_path):
    with pytest.raises(DataError, match="file not found: .*missing.txt"):
        FileCorpus(str(tmp_path / "missing.txt")).fingerprint()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        FileCorpus(str(bad)).load()
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:2: missing field 'text'"):
        FileCorpus(str(nofield)).load()
    with pytest.raises(ConfigError, match="data.format"):
        FileCorpus(str(bad), format="csv")


def test_empty_corpus_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="file is empty: .*empty.txt"):
        FileCorpus(str(empty)).load()
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    tok_src = tmp_path / "t.txt"
    tok_src.write_text(" ".join(WORDS * 50))
    tok = train_bpe(FileCorpus(str(tok_src)), vocab_size=270, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="no documents"):
        PretrainData(tok, FileCorpus(str(blank)), seq_len=8, cache_dir=str(tmp_path / "c"), num_proc=1).prepare()


def test_text_files_one_document_per_line(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("first line\nsecond line\n")
    assert list(FileCorpus(str(path)).load()["text"]) == ["first line", "second line"]


def test_hub_corpus_loads_a_local_dataset_dir(tmp_path):
    from llm.data import HubCorpus

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"content": "hello world"}\n{"content": "bye"}\n')
    assert list(HubCorpus(str(tmp_path / "ds"), text_field="content").load()["text"]) == ["hello world", "bye"]
    streamed = HubCorpus(str(tmp_path / "ds"), text_field="content", streaming=True, max_documents=1).load()
    assert [row["text"] for row in streamed] == ["hello world"]


def test_missing_tokenizer_dir_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_pretrained(str(tmp_path / "nope"))
