"""Mixtures (data=mix): shares laid out from the weights within token budgets and epochs, the realised shares of
what a sampler consumed, and one-line errors for bad weights and empty sources."""

from __future__ import annotations

import numpy as np
import pytest

from llm.data import FileCorpus, Mixture, PretrainData, ResumableSampler, train_bpe
from llm.data.mixture import MixedWindows
from llm.errors import ConfigError, DataError


class _Windows:
    def __init__(self, n: int, tag: int):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert 0 <= i < self.n
        return (self.tag, i)

    collate = staticmethod(list)


def test_windows_are_laid_out_by_share_within_budgets_and_epochs():
    mixed = MixedWindows([("a", _Windows(1000, 0), 0.8, None, 1), ("b", _Windows(100, 1), 0.2, None, 3)], 7, "train")
    assert mixed.counts == [1000, 250] and len(mixed) == 1250  # a is the scarce one; b repeats its windows
    assert mixed.proportions(np.arange(len(mixed))) == {"a": 0.8, "b": 0.2}
    items = [mixed[i] for i in range(len(mixed))]
    assert sorted(i for tag, i in items if tag == 0) == list(range(1000))  # every window of a once
    assert max(np.bincount([i for tag, i in items if tag == 1])) == 3  # b's at most epochs times
    capped = MixedWindows([("a", _Windows(1000, 0), 0.5, 200, 1), ("b", _Windows(500, 1), 0.5, None, 1)], 7, "train")
    assert capped.counts == [200, 200]  # max_tokens: a gives only its first 200 windows
    same = MixedWindows([("a", _Windows(1000, 0), 0.8, None, 1), ("b", _Windows(100, 1), 0.2, None, 3)], 7, "train")
    assert np.array_equal(same.source, mixed.source)  # the order comes from the seed
    sampler = ResumableSampler(len(mixed), batch_size=50, seed=1)
    for _ in range(10):
        sampler.next_indices()
    consumed = sampler.consumed()
    assert len(consumed) == 500 and len(set(consumed.tolist())) == 500


@pytest.mark.parametrize(
    "sources,message",
    [
        ({}, "data.sources is empty"),
        ({"a": {"corpus": "x"}}, "data.sources.a.corpus must be a corpus"),
        ({"a": {"weight": 0}, "b": {"weight": 0}}, r"data.sources: the weights \[0, 0\] must sum to a positive number"),
        ({"a": {"weight": -1}}, r"data.sources.a.weight=-1 must be a number >= 0"),
        ({"a": {"weight": 1, "epochs": 0}}, r"data.sources.a.epochs=0 must be a number > 0"),
        ({"a": {"wieght": 1}}, "data.sources.a.wieght is not a mixture setting; known: corpus, weight"),
    ],
)
def test_bad_mixture_settings_are_one_line_errors(sources, message, tmp_path):
    (tmp_path / "a.txt").write_text("text\n")
    corpus = FileCorpus(str(tmp_path / "a.txt"))
    sources = {k: ({**v, "corpus": corpus} if "corpus" not in v else v) for k, v in sources.items()}
    with pytest.raises(ConfigError, match=message):
        Mixture(sources)


def test_an_empty_source_is_an_error_naming_it(tmp_path):
    (tmp_path / "good.txt").write_text("\n".join(f"line {i} of some text" for i in range(300)) + "\n")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    good = FileCorpus(str(tmp_path / "good.txt"))
    tokenizer = train_bpe(good, vocab_size=270, cache_dir=str(tmp_path / "c"))
    mix = Mixture(
        {"good": {"corpus": good, "weight": 0.5}, "empty": {"corpus": FileCorpus(str(tmp_path / "blank.txt"))}}
    )
    with pytest.raises(DataError, match=r"^data.sources.empty: .*has no documents"):
        PretrainData(tokenizer, mix, seq_len=8, cache_dir=str(tmp_path / "c"), num_proc=1).prepare()
