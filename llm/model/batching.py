"""Continuous batching on the KV cache: sequences join a running batch between decoding steps and leave when done.

The rows share one KV cache, right-aligned as `generation.stream`'s left-padded batches are: every step writes one
column for all rows, and each row's tokens are the last columns of the cache (its padding on the left is masked).
A joining prompt is read alone into a cache of its own (its first token sampled from that read), then its keys and
values are copied into the last columns of a new row; when the prompt is longer than the batch's columns the cache
grows on the left. A step feeds each row its last token at the row's own position. A row that leaves is dropped,
and the columns on the left that no remaining row uses are cut off, so the cache is as long as the longest row.

Each row samples with its own settings and generator (a seeded request gets the same tokens in any batch); greedy
rows take the argmax together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.model.generation import KVCache
from llm.model.sampling import sample_next_token


@dataclass
class Sampling:
    """How one row picks its tokens: temperature 0 is greedy; `generator` seeds its draws."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None


@dataclass
class _Row:
    key: object
    sampling: Sampling
    last: int  # the token fed at the next step
    length: int  # tokens in the cache plus `last`


class RunningBatch:
    """The rows decoding together on `model` (a `gpt.GPT`). `join` reads a prompt and returns its first token;
    `step` returns the next token of every row (in `keys()` order); `leave` drops rows."""

    def __init__(self, model, grow: int = 64):
        self.model, self.grow = model, grow
        self.cache: KVCache | None = None
        self.keep: torch.Tensor | None = None  # [B, L] bool: True on a row's tokens, False on its left padding
        self.rows: list[_Row] = []
        param = next(model.parameters())
        self.device, self.dtype = param.device, model.tok_emb.weight.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list:
        return [r.key for r in self.rows]

    def length(self, key) -> int:
        """Tokens of the row `key` so far: its prompt and what it generated."""
        return next(r.length for r in self.rows if r.key == key)

    @torch.no_grad()
    def join(self, key, prompt_ids: list[int], sampling: Sampling) -> int:
        """Read `prompt_ids` alone, sample its first token and add the row to the batch; returns the token."""
        was_training = self.model.training
        self.model.eval()
        try:
            P = len(prompt_ids)
            own = KVCache(self.model.config, 1, P, self.device, self.dtype)
            x = torch.tensor([prompt_ids], device=self.device)
            logits = self.model(x, kv_cache=own)[:, -1, : self.model.config.vocab_size].float()
            token = self._sample(logits, [sampling])[0]
        finally:
            self.model.train(was_training)
        self._insert(own, P)
        self.rows.append(_Row(key, sampling, token, P + 1))
        return token

    def _insert(self, own: KVCache, P: int) -> None:
        """The prompt's keys/values [n_layer, 1, K, P, hd] become the last P filled columns of a new row."""
        if self.cache is None:
            self.cache = KVCache(self.model.config, 1, P + self.grow, self.device, self.dtype)
            self.cache.k[:, :, :, :P], self.cache.v[:, :, :, :P] = own.k, own.v
            self.cache.length, self.keep = P, torch.ones(1, P, dtype=torch.bool, device=self.device)
            return
        cache, L = self.cache, self.cache.length
        if P > L:  # the batch's rows get more left padding
            pad = list(cache.k.shape)
            pad[3] = P - L
            zeros = torch.zeros(pad, device=self.device, dtype=self.dtype)
            cache.k, cache.v = torch.cat([zeros, cache.k], dim=3), torch.cat([zeros, cache.v], dim=3)
            self.keep = torch.cat([self.keep.new_zeros(len(self.rows), P - L), self.keep], dim=1)
            cache.length = L = P
        shape = list(cache.k.shape)
        shape[1] = 1
        k, v = torch.zeros(shape, device=self.device, dtype=self.dtype), torch.zeros_like(cache.v[:, :1])
        k[:, :, :, L - P : L], v[:, :, :, L - P : L] = own.k, own.v
        cache.k, cache.v = torch.cat([cache.k, k], dim=1), torch.cat([cache.v, v], dim=1)
        row = torch.zeros(1, L, dtype=torch.bool, device=self.device)
        row[:, L - P :] = True
        self.keep = torch.cat([self.keep, row], dim=0)

    @torch.no_grad()
    def step(self) -> list[int]:
        """One decoding step of every row: each row's last token in, its next token out (in `keys()` order)."""
        cache = self.cache
        if cache.length + 1 > cache.k.size(3):  # room for `grow` more steps
            more = list(cache.k.shape)
            more[3] = self.grow
            zeros = torch.zeros(more, device=self.device, dtype=self.dtype)
            cache.k, cache.v = torch.cat([cache.k, zeros], dim=3), torch.cat([cache.v, zeros], dim=3)
        keep = torch.cat([self.keep, self.keep.new_ones(len(self.rows), 1)], dim=1)  # [B, L + 1]
        x = torch.tensor([[r.last] for r in self.rows], device=self.device)
        padded = {}
        # a row has left padding when it has fewer tokens in the cache (length - 1) than the cache has columns:
        # known on the host, where `keep.all()` would wait for the device
        if any(r.length - 1 != cache.length for r in self.rows):  # each row at its own position, never padding
            positions = torch.tensor([[r.length - 1] for r in self.rows], device=self.device)
            padded = {"position_ids": positions, "attn_mask": keep[:, None, None, :]}
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(x, kv_cache=cache, **padded)[:, -1, : self.model.config.vocab_size].float()
        finally:
            self.model.train(was_training)
        self.keep = keep
        tokens = self._sample(logits, [r.sampling for r in self.rows])
        for row, token in zip(self.rows, tokens):
            row.last, row.length = token, row.length + 1
        return tokens

    def leave(self, keys) -> None:
        """Drop the rows of `keys`; cut the columns on the left that no remaining row uses."""
        keys = set(keys)
        stay = [i for i, r in enumerate(self.rows) if r.key not in keys]
        if len(stay) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in stay]
        if not stay:
            self.cache = self.keep = None
            return
        index = torch.tensor(stay, device=self.device)
        cache = self.cache
        cache.k, cache.v, self.keep = cache.k[:, index], cache.v[:, index], self.keep[index]
        first = int(self.keep.any(dim=0).long().argmax())  # the first column some row uses
        if first > 0:
            cache.k, cache.v = cache.k[:, :, :, first:].contiguous(), cache.v[:, :, :, first:].contiguous()
            cache.length -= first
            self.keep = self.keep[:, first:]

    def _sample(self, logits: torch.Tensor, samplings: list[Sampling]) -> list[int]:
        """logits [B, V] -> one token per row: greedy rows by one argmax, the others each with their generator."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(samplings):
            if s.temperature != 0:
                tokens[i] = int(sample_next_token(logits[i : i + 1], s.temperature, s.top_k, s.top_p, s.generator))
        return tokens
