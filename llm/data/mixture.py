"""Mixtures of corpora (`data=mix`): several sources, each with a weight, a token budget and a number of epochs.

`Mixture` is a corpus like the others (the BPE trains on its sources interleaved by weight), and it is what
`PretrainData` prepares part by part: each source is tokenized into its own cache (its own fingerprint, so
changing a weight re-tokenizes nothing). `MixedWindows` then lays the windows of the sources out as one dataset:
source s gets round(p_s * N) of the N windows (p_s: its weight over the sum), N as large as the sources allow
(each gives at most its first `max_tokens` tokens, each window at most `epochs` times), in an order drawn from
the seed. The sampler shuffles these windows like any others; `proportions(indices)` says which share of a set of
windows came from each source — the realised mixture of a run, from the indices its sampler consumed.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from llm.errors import ConfigError, DataError

KNOWN = ("corpus", "weight", "max_tokens", "epochs")


@dataclass(frozen=True)
class MixturePart:
    name: str
    corpus: object  # a corpus from llm.data.sources
    weight: float = 1.0
    max_tokens: int | None = None  # at most this many tokens of the source's training split (None: all)
    epochs: float = 1.0  # each training window of the source used at most this many times


def _number(key: str, value, minimum: float, allow_equal: bool) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= minimum if allow_equal else value > minimum)
    )
    if not ok:
        raise ConfigError(f"{key}={value!r} must be a number {'>=' if allow_equal else '>'} {minimum}")


class Mixture:
    """`sources`: name -> {corpus: <a corpus>, weight, max_tokens, epochs}. `seed` draws the order of windows."""

    def __init__(self, sources: dict, seed: int = 0, sample_prompt: str = ""):
        if not sources:
            raise ConfigError(
                "data.sources is empty: give at least one source, e.g. "
                "data.sources.code={corpus:{_target_:llm.data.StdlibCorpus},weight:1}"
            )
        self.parts = []
        for name, spec in sources.items():
            spec = dict(spec or {})
            unknown = sorted(set(spec) - set(KNOWN))
            if unknown:
                raise ConfigError(
                    f"data.sources.{name}.{unknown[0]} is not a mixture setting; known: {', '.join(KNOWN)}"
                )
            corpus = spec.get("corpus")
            if not (hasattr(corpus, "load") and hasattr(corpus, "fingerprint")):
                raise ConfigError(
                    f"data.sources.{name}.corpus must be a corpus with a _target_ (llm.data.StdlibCorpus,"
                    f" FileCorpus or HubCorpus)"
                )
            part = MixturePart(name, corpus, spec.get("weight", 1.0), spec.get("max_tokens"), spec.get("epochs", 1.0))
            _number(f"data.sources.{name}.weight", part.weight, 0, allow_equal=True)
            _number(f"data.sources.{name}.epochs", part.epochs, 0, allow_equal=False)
            if part.max_tokens is not None:
                _number(f"data.sources.{name}.max_tokens", part.max_tokens, 0, allow_equal=False)
            self.parts.append(part)
        total = sum(p.weight for p in self.parts)
        if not total > 0:
            raise ConfigError(
                f"data.sources: the weights {[p.weight for p in self.parts]} must sum to a positive number"
            )
        self.shares = [p.weight / total for p in self.parts]
        self.seed, self.sample_prompt = seed, sample_prompt or ""

    def fingerprint(self) -> str:
        parts = [(p.name, p.corpus.fingerprint(), p.weight) for p in self.parts]
        return hashlib.sha256(json.dumps(["mix", parts, self.seed]).encode()).hexdigest()[:16]

    def load(self):
        """The sources' documents interleaved by weight (what the tokenizer trains on)."""
        import datasets

        loaded = [(p.corpus.load(), share) for p, share in zip(self.parts, self.shares) if share > 0]
        if any(isinstance(ds, datasets.IterableDataset) for ds, _ in loaded):  # one kind for interleave_datasets
            loaded = [
                (ds if isinstance(ds, datasets.IterableDataset) else ds.to_iterable_dataset(), s) for ds, s in loaded
            ]
        if len(loaded) == 1:
            return loaded[0][0]
        return datasets.interleave_datasets(
            [ds for ds, _ in loaded],
            probabilities=[s for _, s in loaded],
            seed=self.seed,
            stopping_strategy="all_exhausted",
        )

    def describe(self) -> str:
        return "mixture of " + ", ".join(
            f"{p.name} {s:.0%} ({p.corpus.describe()})" for p, s in zip(self.parts, self.shares)
        )


class MixedWindows(torch.utils.data.Dataset):
    """The windows of several `PackedTokens` laid out by share (see the module docstring).

    `parts`: (name, windows, share, max windows or None, epochs) per source."""

    def __init__(self, parts: list[tuple], seed: int, split: str):
        self.names, self.datasets = [p[0] for p in parts], [p[1] for p in parts]
        self.collate = self.datasets[0].collate
        available = [len(ds) if limit is None else min(len(ds), limit) for _, ds, _, limit, _ in parts]
        for (name, _, share, _, _), n in zip(parts, available):
            if share > 0 and n == 0:
                raise DataError(
                    f"data.sources.{name}: the {split} split has no window of trainer.seq_len tokens; "
                    f"give it more text or a larger max_tokens"
                )
        uses = [n * epochs for n, (_, _, _, _, epochs) in zip(available, parts)]
        total = min(math.floor(u / p[2]) for u, p in zip(uses, parts) if p[2] > 0)
        self.counts = [min(int(round(p[2] * total)), int(u)) for u, p in zip(uses, parts)]
        order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(
            np.repeat(np.arange(len(parts)), self.counts)
        )
        self.source = order.astype(np.int16)
        self.local = np.empty(len(order), dtype=np.int64)  # window of its source: cycling through the epochs
        for s, n in enumerate(available):
            where = np.flatnonzero(self.source == s)
            self.local[where] = np.arange(len(where)) % max(n, 1)
        self.available = available

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return self.datasets[self.source[i]][int(self.local[i])]

    def describe(self) -> str:
        return ", ".join(
            f"{name} {n / max(len(self), 1):.1%} ({n:,} of {a:,} windows)"
            for name, n, a in zip(self.names, self.counts, self.available)
        )

    def proportions(self, indices: np.ndarray) -> dict[str, float]:
        """Share of each source among these windows (e.g. every window a run has trained on)."""
        if len(indices) == 0:
            return {}
        counts = np.bincount(self.source[indices], minlength=len(self.names))
        return {name: float(c / len(indices)) for name, c in zip(self.names, counts)}
