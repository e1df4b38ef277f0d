"""The pieces beside the loop, each on its own: settings sorted into their groups, the declared objective
interface, the metrics window, the checkpointer, and an evaluation-only run."""

from __future__ import annotations

import pytest
import torch

from llm.checkpoint.checkpointer import Checkpointer
from llm.checkpoint.files import list_checkpoints
from llm.contract import Data, Objective
from llm.errors import ConfigError
from llm.eval.length import LengthEval
from llm.eval.sample import SampleSettings
from llm.model import build_gpt
from llm.train import DPO, SFT, LanguageModeling, RunInfo, Trainer, trainer_settings
from llm.train.loggers import MetricsWindow
from llm.train.optim import OptimizerConfig
from llm.train.settings import CadenceSettings, HardwareSettings, LoopSettings


def test_flat_keys_are_sorted_into_groups():
    s = trainer_settings(
        max_steps=7,
        save_every=3,
        keep_last=2,
        strategy="ddp",
        nproc_per_node=2,
        sample={"prompt": "def ", "max_new_tokens": 4},
    )
    assert s.loop == LoopSettings(max_steps=7)
    assert s.cadence == CadenceSettings(save_every=3, keep_last=2)
    assert s.hardware == HardwareSettings(strategy="ddp", nproc_per_node=2)
    assert s.sample == SampleSettings(prompt="def ", max_new_tokens=4)


@pytest.mark.parametrize(
    "flat,message",
    [
        ({"max_step": 5}, "trainer.max_step is not a trainer setting; known: activation_checkpointing, batch_size"),
        ({"sample": {"promt": "x"}}, "task.sample.promt is not a sample setting"),
        ({"log_every": 0}, "trainer.log_every=0 must be an integer >= 1"),
        ({"max_steps": -1}, "trainer.max_steps=-1 must be an integer >= 0"),
        ({"precision": "fp8"}, "trainer.precision='fp8' is not allowed"),
        ({"micro_batch_size": -2}, "trainer.micro_batch_size=-2 must be an integer >= 1 (or null)"),
    ],
)
def test_bad_settings_name_the_key(flat, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trainer_settings(**flat)


def test_objectives_declare_the_interface():
    for objective in (LanguageModeling(), SFT(), DPO()):
        assert isinstance(objective, Objective) and objective.trains
    length = LengthEval(context=16)
    assert isinstance(length, Objective) and not length.trains
    base = Objective()
    assert base.setup(None, None) is None and base.evaluate(None, None) == {} and base.finish({}, None) is None
    with pytest.raises(NotImplementedError):
        base.loss(None, {})


def test_metrics_window_means_and_carries_over_a_checkpoint():
    window = MetricsWindow(torch.device("cpu"))
    for loss in (1.0, 2.0, 6.0):
        window.add({"loss": torch.tensor(loss)}, tokens=10)
    assert window.mean() == {"loss": 3.0} and window.tokens == 30
    saved = window.state_dict()
    assert saved == {"sums": {"loss": 9.0}, "steps": 3}
    resumed = MetricsWindow(torch.device("cpu"), saved)  # a resume in the middle of a logging window
    resumed.add({"loss": torch.tensor(3.0)}, tokens=10)
    assert resumed.mean() == {"loss": 3.0}
    resumed.clear()
    assert resumed.steps == 0 and resumed.sums == {} and resumed.tokens == 0


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_gpt(vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16)


def test_checkpointer_saves_prunes_points_and_restores(tmp_path):
    model, optimizer = _tiny_model(), None
    optimizer = OptimizerConfig(lr=1e-2).build(model, "cpu")
    model(torch.randint(0, 32, (2, 8))).sum().backward()
    optimizer.step()
    saver = Checkpointer(tmp_path, keep_last=1)
    saver.save(1, model, optimizer, {"step": 1})
    newest = saver.save(2, model, optimizer, {"step": 2})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002"]
    assert (tmp_path / "checkpoints" / "last").read_text().strip() == newest.name
    fresh = _tiny_model(seed=1)
    fresh_optimizer = OptimizerConfig(lr=1e-2).build(fresh, "cpu")
    assert Checkpointer(tmp_path).restore("auto", fresh, fresh_optimizer) == {"step": 2}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert Checkpointer(tmp_path / "elsewhere").restore("auto", fresh, None) is None  # nothing to resume


class _Windows:
    """A tiny dataset of fixed token windows with the batch contract's keys."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, 32, (9,), generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i][:-1], "labels": self.rows[i][1:]}

    @staticmethod
    def collate(items):
        return {k: torch.stack([x[k] for x in items]) for k in items[0]}


class _Data(Data):
    def __init__(self):
        self.train, self.val = _Windows(8), _Windows(4)

    def prepare(self):
        return self


class _EvalOnly(LanguageModeling):
    trains = False


def test_an_evaluation_only_objective_takes_no_step_and_builds_no_optimizer(tmp_path):
    settings = trainer_settings(max_steps=5, batch_size=4, seq_len=8, eval_batches=1, progress=False)
    trainer = Trainer(
        _tiny_model(), _Data(), _EvalOnly(), OptimizerConfig(warmup_steps=0), settings, RunInfo(str(tmp_path))
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    results = trainer.fit()
    assert trainer.optimizer is None and results["steps"] == 0
    assert trainer.state.seconds > 0  # the evaluation's wall time (results.json rounds it to 10 ms)
    assert results["val_loss"] == results["initial_val_loss"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "results.json").is_file()
