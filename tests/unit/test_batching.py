"""Continuous batching on the KV cache (llm/model/batching.py): sequences that join a running batch at different
steps, with prompts of different lengths, and leave at different steps get the greedy tokens they get alone from
`GPT.generate` — with RoPE, learned positions and a sliding window; a seeded row samples the same tokens in a batch
as alone; the cache never keeps columns no row uses."""

from __future__ import annotations

import random

import pytest
import torch

from llm.model import GPT, GPTConfig
from llm.model.batching import RunningBatch, Sampling


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than two that wait for each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(**options) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64, **options)
    return GPT(config).eval()


def _run(batch: RunningBatch, prompts, lengths, samplings, join_every: int = 2) -> dict:
    """Join one prompt every `join_every` steps; each row leaves after its own number of tokens."""
    out, waiting, step = {}, list(enumerate(prompts)), 0
    while waiting or len(batch):
        if waiting and step % join_every == 0:
            i, prompt = waiting.pop(0)
            out[i] = [batch.join(i, prompt, samplings[i])]
        if len(batch):
            for key, token in zip(batch.keys(), batch.step()):
                out[key].append(token)
            batch.leave([k for k in batch.keys() if len(out[k]) >= lengths[k]])
            if len(batch):  # the cache is as long as its longest row
                assert batch.keep.any(dim=0)[0] and batch.cache.length == max(map(batch.length, batch.keys())) - 1
        step += 1
    return out


@pytest.mark.parametrize(
    "options", [{}, {"pos_emb": "learned"}, {"sliding_window": 5, "sliding_layers": [0]}], ids=["rope", "learned", "sw"]
)
def test_joining_and_leaving_rows_get_their_alone_tokens(options):
    model = _model(**options)
    rng = random.Random(0)
    prompts = [[rng.randrange(97) for _ in range(rng.randint(1, 14))] for _ in range(7)]
    lengths = [rng.randint(3, 12) for _ in prompts]
    alone = [
        model.generate(torch.tensor([p]), n, temperature=0)[0, len(p) :].tolist() for p, n in zip(prompts, lengths)
    ]
    out = _run(RunningBatch(model, grow=4), prompts, lengths, [Sampling(0)] * len(prompts))
    assert [out[i][: lengths[i]] for i in range(len(prompts))] == alone


def test_seeded_rows_sample_the_same_tokens_in_a_batch():
    model = _model()
    prompts, lengths = [[1, 2, 3], [4, 5, 6, 7, 8], [9]], [10, 10, 10]

    def sampling(i):
        return Sampling(1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(i))

    together = _run(RunningBatch(model), prompts, lengths, [sampling(i) for i in range(3)], join_every=1)
    for i, prompt in enumerate(prompts):
        assert _run(RunningBatch(model), [prompt], [10], [sampling(i)])[0] == together[i]
