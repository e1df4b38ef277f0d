"""The padded embedding rows never enter a softmax: logits, the training loss (fused head or soft-capped logits),
DPO's and GRPO's log-probs and sampling are all over the real vocabulary (model.config.vocab_size), as in a model
without padding (an exported HF model has none).

The model has 100 tokens padded to 128 rows, and its padded head rows are made large, so that a softmax over them
would put most of its mass on ids that do not exist."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.model import build_gpt, sample_next_token
from llm.train.grpo import token_logps
from llm.train.objectives import LanguageModeling, sequence_logps

V = 100


def padded_model(**kw):
    torch.manual_seed(0)
    model = build_gpt(vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, d_model=32, max_seq_len=16, **kw).eval()
    assert model.config.padded_vocab_size == 128
    with torch.no_grad():
        model.lm_head.weight[V:] = torch.randn(28, 32)  # 50x the init scale: padded logits of about +-6
    return model


def batch():
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, :4] = -100  # a prompt
    labels[:, -1] = -100
    return ids, labels


def real_vocab_logprobs(model, ids, softcap=None):
    """log-softmax over the real rows of the head only, from the final hidden states: [B, T, V]."""
    hidden = []
    handle = model.norm_f.register_forward_hook(lambda m, i, out: hidden.append(out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    logits = hidden[0] @ model.lm_head.weight[:V].t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("softcap", [None, 30.0])  # None: the fused head + loss; 30: the full-logits path
def test_logits_loss_and_logprobs_are_over_the_real_vocabulary(softcap):
    model = padded_model(logit_softcap=softcap)
    ids, labels = batch()
    want = real_vocab_logprobs(model, ids, softcap)
    valid = labels != -100
    want_tokens = want.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid  # [B, T]
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (3, 12, V)  # no column for a padded row
        torch.testing.assert_close(logits.double().softmax(-1).sum(-1), torch.ones(3, 12, dtype=torch.double))
        torch.testing.assert_close(sequence_logps(model, ids, labels).double(), want_tokens.sum(1), atol=1e-4, rtol=0)
        for temperature in (1.0, 0.7):  # GRPO: the fused path at 1, the logits / temperature otherwise
            got = token_logps(model, ids, labels, temperature).double()
            if temperature == 1.0:
                torch.testing.assert_close(got, want_tokens, atol=1e-5, rtol=0)
            else:
                scaled = F.log_softmax(logits.double() / temperature, -1)
                torch.testing.assert_close(got, scaled.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid)
    for chunk in (0, 5):  # one chunk, and several through the reused buffer
        loss, metrics = LanguageModeling(loss_chunk_size=chunk).loss(model, {"input_ids": ids, "labels": labels})
        assert loss.item() == pytest.approx(-(want_tokens.sum() / valid.sum()).item(), abs=1e-5)
    loss.backward()  # the padded rows get no gradient: nothing pushes them down any more
    assert model.lm_head.weight.grad[V:].abs().max() == 0 and model.lm_head.weight.grad[:V].abs().max() > 0


def test_sampling_never_draws_a_padded_id():
    model = padded_model()
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a sampler of one's own on the model's logits (the padded rows would win most draws)
        assert sample_next_token(model(prompt)[:, -1].repeat(100, 1), generator=gen).max() < V
    out = model.generate(prompt, 12, temperature=1.5, generator=gen, num_samples=8)  # 192 draws, flattened
    assert out.max() < V
    assert model.generate(prompt, 12, temperature=0).max() < V  # greedy
