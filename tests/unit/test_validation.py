"""Every key is validated before any work: the composed config goes through `llm.tasks.config.validate` (in-process, no
tokenizer, no data, no weights), and each bad value is one ConfigError naming the key, the value and what is
allowed. Classes: type (counts are integers), finiteness, range, in every group."""

from __future__ import annotations

import re

import pytest
import torch

from llm.errors import ConfigError, TrainingError, check_int, check_number
from llm.tasks.config import validate
from llm.train import OptimizerConfig, RunInfo, Trainer, trainer_settings
from llm.train.objectives import LanguageModeling
from tests.conftest import compose_config
from tests.unit.test_trainer_parts import _Data, _tiny_model

BAD = [
    # type: an integer where something is counted
    (["trainer.max_steps=2.5"], "trainer.max_steps=2.5 must be an integer >= 0"),
    (["trainer.batch_size=true"], "trainer.batch_size=True must be an integer >= 1"),
    (["trainer.save_every=abc"], "trainer.save_every='abc' must be an integer >= 0"),
    (["optim.warmup_steps=1.5"], "optim.warmup_steps=1.5 must be an integer >= 0"),
    (["model.n_layer=2.0"], "model.n_layer=2.0 must be an integer >= 1"),
    (["data.max_bytes=1e6"], "data.max_bytes=1000000.0 must be an integer >= 1"),
    (["tokenizer.min_frequency=0"], "tokenizer.min_frequency=0 must be an integer >= 1"),
    (["task=sft", "post_data.train.num_examples=2.5"], "post_data.train.num_examples=2.5 must be an integer >= 1"),
    (["trainer.progress=maybe"], "trainer.progress='maybe' must be true or false"),
    (["overwrite=yes"], "overwrite='yes' must be true or false"),
    # finite
    (["optim.lr=inf"], "optim.lr=inf must be a finite number > 0"),
    (["optim.lr=nan"], "optim.lr=nan must be a finite number > 0"),
    (["extrapolation=yarn", "extrapolation.factor=nan"], "extrapolation.factor=nan must be a finite number >= 1"),
    (["extrapolation=yarn", "extrapolation.beta_fast=inf"], "extrapolation.beta_fast=inf must be a finite number"),
    (["task.data.val_fraction=nan"], "task.data.val_fraction=nan must be a finite number"),
    (["trainer.peak_flops=inf"], "trainer.peak_flops=inf must be a finite number > 0"),
    # range
    (["trainer.grad_clip=-1"], "trainer.grad_clip=-1 must be a finite number > 0 (or null)"),
    (["trainer.keep_last=-1"], "trainer.keep_last=-1 must be an integer >= 1 (or null)"),
    (["trainer.keep_last=0"], "trainer.keep_last=0 must be an integer >= 1 (or null)"),
    (["model.rope_theta=0"], "model.rope_theta=0 must be a finite number > 0"),
    (["+model.norm_eps=-1e-5"], "model.norm_eps=-1e-05 must be a finite number > 0"),
    (["model.dropout=1.0"], "model.dropout=1.0 must be a finite number in [0, 1)"),
    (["optim.betas=[0.9,1.0]"], "optim.betas[1]=1.0 must be a finite number in [0, 1)"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9] must be two numbers in [0, 1)"),
    (["optim.init_state=last"], "optim.init_state='last' is not allowed; choose one of ['checkpoint', 'fresh']"),
    (["optim.experts=sgd"], "optim.experts='sgd' is not allowed; choose one of ['adamw', 'muon']"),
    (["optim.init_state=checkpoint"], "optim.init_state=checkpoint takes init_from's optimizer state"),
    (["optim.eps=0"], "optim.eps=0 must be a finite number > 0"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2 must be a finite number in [0, 1]"),
    (["task.data.val_fraction=1"], "task.data.val_fraction=1 must be a finite number in [0, 1)"),
    (["trainer.strategy=zero3"], "trainer.strategy='zero3' is not allowed"),
    (["task.sample.temperature=-1"], "task.sample.temperature=-1 must be a finite number >= 0"),
    (["+task.sample.top_p=0"], "task.sample.top_p=0 must be a finite number in (0, 1] (or null)"),
    (["task=dpo", "task.objective.beta=nan"], "task.objective.beta=nan must be a finite number > 0"),
    (
        ["task=dpo", "task.objective.label_smoothing=0.5"],
        "task.objective.label_smoothing=0.5 must be a finite number in [0, 0.5)",
    ),
    # seeds: the range NumPy accepts
    (["seed=abc"], "seed='abc' must be an integer in [0, 4294967295]"),
    (["seed=-1"], "seed=-1 must be an integer in [0, 4294967295]"),
    (["seed=4294967296"], "seed=4294967296 must be an integer in [0, 4294967295]"),
    (["task.data.split_seed=1.5"], "task.data.split_seed=1.5 must be an integer in [0, 4294967295]"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_key_is_one_error_naming_it(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate(cfg)


@pytest.mark.parametrize("preset", ["tiny", "125m", "1b"])
def test_the_shipped_configs_pass(preset):
    built = validate(compose_config([f"model={preset}"]))
    assert built["settings"].loop.max_steps == 150 and built["optim"].lr > 0
    for task in ("sft", "dpo", "eval_length"):
        validate(compose_config([f"task={task}", f"model={preset}"]))


def test_the_checks_return_what_passes():
    assert check_int("k", 3, 1) == 3 and check_int("k", None, 1, allow_none=True) is None
    assert check_number("k", 0.5, 0, 1, high_open=True) == 0.5
    with pytest.raises(ConfigError, match=r"k=nan must be a finite number$"):
        check_number("k", float("nan"))


def test_a_run_whose_every_step_was_skipped_is_an_error(tmp_path):
    settings = trainer_settings(
        max_steps=2, batch_size=4, seq_len=8, eval_batches=1, log_every=5, progress=False, nan_steps=[1, 2]
    )
    trainer = Trainer(
        _tiny_model(),
        _Data(),
        LanguageModeling(),
        OptimizerConfig(lr=1e-2, warmup_steps=0),
        settings,
        RunInfo(str(tmp_path)),
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(TrainingError, match="all 2 steps had a non-finite loss or gradient norm"):
        trainer.fit()
    assert not (tmp_path / "results.json").exists()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))
