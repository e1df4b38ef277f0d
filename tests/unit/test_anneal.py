"""An anneal branch (experiment=anneal): from a checkpoint of a constant-lr run, the branch decays the lr over its
own steps and ends below the validation loss of the checkpoint it started from; results.json names it. With
optim.init_state=checkpoint it continues the checkpoint's optimizer state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from llm.checkpoint.files import latest_checkpoint, load_model_weights, read_optimizer
from llm.contract import Data
from llm.data.pretrain import PackedTokens
from llm.errors import ConfigError
from llm.model import build_gpt
from llm.train import LanguageModeling, MuonConfig, OptimizerConfig, RunInfo, Trainer, trainer_settings
from llm.train.branch import continue_optimizer
from tests.conftest import compose_config

TINY = dict(vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16)


class _Pattern(Data):
    """A learnable stream: a fixed random cycle of 23 tokens with 10% of them replaced by noise."""

    def __init__(self, path):
        rng = np.random.default_rng(0)
        cycle = rng.integers(0, 32, 23)
        tokens = np.tile(cycle, 200)
        noise = rng.random(tokens.size) < 0.1
        tokens[noise] = rng.integers(0, 32, noise.sum())
        tokens.astype(np.uint16).tofile(path)
        self.train = self.val = PackedTokens(path, 15, "uint16")

    def prepare(self):
        return self


def _fit(run_dir, data, optim, steps, init_from=None):
    model = build_gpt(**TINY)
    if init_from:
        load_model_weights(init_from, model)
    settings = trainer_settings(
        max_steps=steps,
        batch_size=8,
        seq_len=15,
        eval_every=0,
        eval_batches=2,
        progress=False,
        sample={"max_new_tokens": 0},
    )
    run = RunInfo(str(run_dir), config={"init_from": str(init_from) if init_from else None})
    return Trainer(model, data, LanguageModeling(), optim, settings, run).fit()


def test_branch_ends_below_its_checkpoint(tmp_path):
    data = _Pattern(tmp_path / "t.bin")
    stable = instantiate(
        compose_config(["optim=adamw", "optim.schedule=constant", "optim.warmup_steps=2", "optim.lr=0.01"]).optim,
        _convert_="all",
    )
    _fit(tmp_path / "stable", data, stable, 12)
    checkpoint = latest_checkpoint(tmp_path / "stable")
    anneal = instantiate(compose_config(["optim=adamw", "experiment=anneal", "optim.lr=0.01"]).optim, _convert_="all")
    assert (anneal.schedule, anneal.decay_fraction) == ("wsd", 1.0)
    assert anneal.lr_factor(4, 20) == 1.0 > anneal.lr_factor(5, 20) and anneal.lr_factor(19, 20) == 0.1
    results = _fit(tmp_path / "branch", data, anneal, 12, init_from=checkpoint)
    origin = json.loads((checkpoint / "trainer_state.json").read_text())["last_val_loss"]
    assert results["initial_val_loss"] == origin  # the branch starts where its checkpoint ended
    assert results["val_loss"] < origin
    assert (results["init_from"], results["init_from_step"]) == (str(checkpoint), 12)
    assert results["init_from_val_loss"] == origin


def test_a_branch_can_continue_the_checkpoints_optimizer_state(tmp_path):
    """optim.init_state=checkpoint: the branch's optimizer starts with the checkpoint's moments and step count (its
    own hyper-parameters kept), and its step count goes on from there; fresh starts at 0; another optim or a dir
    without optimizer state is refused in one line."""
    data = _Pattern(tmp_path / "t.bin")
    _fit(tmp_path / "stable", data, OptimizerConfig(lr=0.01, warmup_steps=0, schedule="constant"), 4)
    checkpoint = latest_checkpoint(tmp_path / "stable")
    saved = read_optimizer(checkpoint)
    model = build_gpt(**TINY)
    optim = OptimizerConfig(lr=0.01, weight_decay=0.05, init_state="checkpoint")
    opt = optim.build(model, "cpu")
    continue_optimizer(str(checkpoint), model, opt)
    state = opt.state_dict()["state"]
    assert sorted(state) == sorted(saved["state"]) and saved["state"][0]["step"] == 4
    assert all(torch.equal(state[i][k], v) for i in saved["state"] for k, v in saved["state"][i].items())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]  # this run's, not the checkpoint's 0.1
    for init_state, step in (("checkpoint", 4 + 2), ("fresh", 2)):
        branch = tmp_path / init_state
        _fit(branch, data, OptimizerConfig(lr=0.01, warmup_steps=0, init_state=init_state), 2, init_from=checkpoint)
        assert read_optimizer(latest_checkpoint(branch))["state"][0]["step"] == step
    with pytest.raises(ConfigError, match=r"has parameter groups \[\('decay', \d+\), \('no_decay', \d+\)\], this"):
        continue_optimizer(str(checkpoint), model, MuonConfig().build(model, "cpu"))
    with pytest.raises(ConfigError, match="holds no optimizer state"):
        continue_optimizer(str(tmp_path), model, opt)
