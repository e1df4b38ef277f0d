"""Loss-spike skipping (trainer.spike_skip): an injected spike's update is skipped and counted, the run goes on
and resumes with the same window; spikes in a row stop the run like non-finite steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm.contract import Data
from llm.data.pretrain import PackedTokens
from llm.errors import TrainingError
from llm.model import build_gpt
from llm.train import LanguageModeling, OptimizerConfig, RunInfo, Trainer, trainer_settings
from llm.train.guard import StepGuard


def test_guard_judges_against_the_window_and_resumes_it():
    guard = StepGuard("cpu", spike_skip=3.0, window=4)
    losses = [5.0, 4.9, 5.1, 5.0]
    assert [guard.spike(torch.tensor(x)).item() for x in losses] == [0, 0, 0, 0]  # filling: never a spike
    mean, std = np.mean(losses), np.std(losses, ddof=1)
    assert guard.spike(torch.tensor(mean + 3.5 * std)).item() == 1.0  # above mean + 3 std: skipped, not kept
    assert guard.spike(torch.tensor(mean + 2.5 * std)).item() == 0.0  # below: kept, the oldest (5.0) leaves
    again = StepGuard("cpu", spike_skip=3.0, window=4, state=json.loads(json.dumps(guard.state_dict())))
    assert (
        again.state_dict()
        == guard.state_dict()
        == {"values": [float(np.float32(x)) for x in (4.9, 5.1, 5.0, mean + 2.5 * std)]}
    )
    for x in (9.0, 5.02, float("nan")):
        assert again.spike(torch.tensor(x)).item() == guard.spike(torch.tensor(x)).item()
    assert StepGuard("cpu").spike(torch.tensor(1e9)) is None  # off by default


class _Pattern(Data):
    def __init__(self, path):
        rng = np.random.default_rng(0)
        np.tile(rng.integers(0, 32, 23), 100).astype(np.uint16).tofile(path)
        self.train = self.val = PackedTokens(path, 15, "uint16")

    def prepare(self):
        return self


def _fit(run_dir, steps, **kw):
    torch.manual_seed(0)
    model = build_gpt(vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16)
    settings = trainer_settings(
        max_steps=steps,
        batch_size=4,
        seq_len=15,
        eval_every=0,
        eval_batches=1,
        log_every=1,
        progress=False,
        sample={"max_new_tokens": 0},
        spike_skip=4.0,
        spike_window=3,
        **kw,
    )
    optim = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant")
    return Trainer(
        model, _Pattern(run_dir.parent / "t.bin"), LanguageModeling(), optim, settings, RunInfo(str(run_dir))
    ).fit()


def test_an_injected_spike_is_skipped_and_the_run_goes_on(tmp_path):
    results = _fit(tmp_path / "spike", 7, spike_steps=[5])
    lines = [json.loads(x) for x in (tmp_path / "spike" / "metrics.jsonl").read_text().splitlines()]
    skipped = {x["step"]: x["skipped_steps"] for x in lines if "skipped_steps" in x}
    assert skipped[4] == 0 and skipped[5] == skipped[7] == 1 and results["skipped_steps"] == 1
    assert lines[5]["loss"] > 50 * lines[4]["loss"]  # the spike was there (x100); its update was skipped
    assert results["steps"] == 7 and np.isfinite(results["val_loss"])
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss or gradient norm, or a loss"):
        _fit(tmp_path / "spikes", 7, spike_steps=[4, 5, 6], max_consecutive_skips=3)
