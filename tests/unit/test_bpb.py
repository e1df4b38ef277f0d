"""Bits per byte: the bytes-per-token table, and `val_bpb` against a hand computation on a tiny text, through the
trainer's evaluation and the length evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llm.contract import Data
from llm.data import FileCorpus, train_bpe
from llm.data.pretrain import PackedTokens
from llm.data.tokenizer import token_byte_lengths
from llm.eval.length import LengthEval
from llm.model import build_gpt
from llm.train import LanguageModeling, RunInfo, Trainer, trainer_settings
from llm.train.loggers import TensorBoardLogger
from llm.train.optim import OptimizerConfig

pytestmark = pytest.mark.xdist_group("bpb")  # one worker trains the module's tokenizer

TEXT = "hello wörld ✓ naïve café, ünïcödé € 😀 x = 1\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpb")
    rng = np.random.default_rng(0)
    words = "hello world naïve café ünïcödé x = 1 def return".split()
    (tmp / "c.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(200)) + "\n")
    return train_bpe(FileCorpus(str(tmp / "c.txt")), vocab_size=300, cache_dir=str(tmp / "cache"))


def test_byte_table_sums_to_the_utf8_length_and_specials_count_zero(tokenizer):
    table = token_byte_lengths(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert table[ids].sum() == len(TEXT.encode("utf-8"))  # partial multi-byte characters included
    assert all(table[i] == 0 for i in tokenizer.all_special_ids)  # EOS, BOS, PAD, chat markers


class _Data(Data):
    """The tiny text packed as one validation window (and the same as training data), with its bytes table."""

    def __init__(self, tokenizer, path):
        ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        np.asarray(ids, dtype=np.uint16).tofile(path)
        self.ids, self.tokenizer = ids, tokenizer
        self.train = self.val = PackedTokens(path, len(ids) - 1, "uint16")
        self.token_bytes = token_byte_lengths(tokenizer)

    def prepare(self):
        return self


def _hand_bpb(model, tokenizer, ids) -> tuple[float, float]:
    """(nats summed over the targets ids[1:], bits per byte) from the model's logits, bytes from decoding."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].double()  # [T, V]: the real vocabulary, as in the model's loss
    nats = -logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    target_bytes = len(TEXT.encode()) - len(tokenizer.decode(ids[:1]).encode())  # all but the first token; EOS: 0
    return nats, nats / target_bytes / math.log(2)


def test_val_bpb_is_summed_nats_over_utf8_bytes_in_bits(tokenizer, tmp_path):
    data = _Data(tokenizer, tmp_path / "val.bin")
    torch.manual_seed(0)
    model = build_gpt(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=64)
    _, before = _hand_bpb(model, tokenizer, data.ids)
    # one step: the evaluation before it and the final one after it, which goes to every logger
    settings = trainer_settings(max_steps=1, batch_size=1, seq_len=len(data.ids) - 1, progress=False)
    results = Trainer(
        model,
        data,
        LanguageModeling(),
        OptimizerConfig(lr=1e-2, warmup_steps=0),
        settings,
        RunInfo(str(tmp_path)),
        tokenizer=tokenizer,
        loggers=[TensorBoardLogger],
    ).fit()
    nats, expected = _hand_bpb(model, tokenizer, data.ids)  # the trained weights
    assert results["initial_val_bpb"] == pytest.approx(before, rel=1e-5)
    assert results["val_bpb"] == pytest.approx(expected, rel=1e-5) and expected != pytest.approx(before)
    assert results["val_loss"] == pytest.approx(nats / (len(data.ids) - 1), rel=1e-5)  # unchanged: nats per token
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["val_bpb"] == pytest.approx(expected, rel=1e-5) and "val_bpb_nats" not in logged
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert events.Scalars("val_bpb")[-1].value == pytest.approx(expected, rel=1e-5)
    # the length evaluation reports the same figure per length (context = the whole text, one window)
    evaluation = LengthEval(context=len(data.ids) - 1, multiples=[1], windows=1)
    evaluation.setup(model, data)
    ppl, bits = evaluation.perplexity(model, data, len(data.ids) - 1)
    assert bits == pytest.approx(expected, rel=1e-5) and ppl == pytest.approx(math.exp(results["val_loss"]), rel=1e-5)
