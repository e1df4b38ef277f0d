"""Checkpoints: round trip without pickle, manifest checks, corrupt/incomplete fallback, failed saves, pruning."""

from __future__ import annotations

import errno
import json

import pytest
import torch

import llm.checkpoint.files as ckpt
from llm.model import build_gpt
from llm.train.optim import OptimizerConfig
from llm.train.state import capture_rng, restore_rng


def _trained(steps=3):
    torch.manual_seed(0)
    model = build_gpt(vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16)
    opt = OptimizerConfig(lr=1e-2).build(model, "cpu")
    x = torch.randint(0, 50, (2, 9))
    for _ in range(steps):
        model(x[:, :-1]).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(run, step, model, opt):
    return ckpt.save_checkpoint(
        run / "checkpoints" / ckpt.step_dir_name(step), model, opt, {"step": step}, model.config.to_dict()
    )


def test_round_trip_restores_model_and_optimizer(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, 3, model, opt)
    assert ckpt.is_complete(path) and not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))
    fresh, _ = _trained(steps=0)
    fresh_opt = OptimizerConfig(lr=1e-2).build(fresh, "cpu")
    ckpt.load_model_weights(path, fresh)
    ckpt.load_optimizer(path, fresh_opt)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    for i, state in sa["state"].items():
        for k, v in state.items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)
    assert sa["param_groups"] == sb["param_groups"]


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(capture_rng()))
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    restore_rng(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_corrupt_or_incomplete_newest_falls_back_with_a_warning(tmp_path):
    model, opt = _trained()
    _save(tmp_path, 2, model, opt)
    newest = _save(tmp_path, 4, model, opt)
    with open(newest / "model.safetensors", "r+b") as f:  # same size, different bytes: caught by sha256
        f.seek(100)
        f.write(b"\x00" * 8)
    messages = []
    handler = ckpt.logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        assert ckpt.latest_checkpoint(tmp_path).name == "step_0000002"
    finally:
        ckpt.logger.remove(handler)
    assert any("step_0000004" in m and "corrupt" in m for m in messages)
    (newest / "manifest.json").unlink()  # an interrupted save has no manifest
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000002"
    (tmp_path / "checkpoints" / "step_0000006.tmp").mkdir()  # a save killed half-way
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000002"


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained()
    good = _save(tmp_path, 2, model, opt)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 4, model, opt)
    assert ckpt.is_complete(good)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002"]  # no half-written dir
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_prune_keeps_the_newest_complete(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt)
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(ckpt.ConfigError, match="no such run or checkpoint directory"):
        ckpt.resolve_checkpoint(tmp_path / "nope", "init_from")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ckpt.ConfigError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "empty_run", "resume")


def test_metrics_log_on_resume_drops_later_steps_and_a_torn_line(tmp_path):
    from llm.train.loggers import JsonlLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.9}\n{"step": 15, "loss": 0.8}\n{"step": 20, "lo')
    before = path.read_text()
    JsonlLogger(str(tmp_path), start_step=10).close()  # a resume that failed before logging: the file is untouched
    assert path.read_text() == before
    resumed = JsonlLogger(str(tmp_path), start_step=10)  # resumed from the step-10 checkpoint after a crash
    resumed.log({"loss": 0.7}, 15)
    resumed.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10, 15]
    restarted = JsonlLogger(str(tmp_path), start_step=0)  # started over: nothing of the earlier attempt is kept
    restarted.open()
    restarted.close()
    assert path.read_text() == ""


def test_latest_and_best_runs_say_what_they_picked(tmp_path):
    """latest:<task> is the newest finished run, best:<task> the lowest val_loss; the choice is logged with its
    steps and val_loss, so a 10-step smoke test picked by latest: is easy to spot."""
    import os
    import time

    runs = {"long": (2000, 1.9), "smoke": (10, 7.5), "other_task": (50, 0.1)}
    for i, (name, (steps, val)) in enumerate(runs.items()):
        run = tmp_path / "outputs" / name
        run.mkdir(parents=True)
        task = "sft" if name == "other_task" else "pretrain"
        (run / "results.json").write_text(json.dumps({"task": task, "steps": steps, "val_loss": val}))
        os.utime(run / "results.json", (time.time() + i, time.time() + i))  # "smoke" finished after "long"
    messages = []
    handler = ckpt.logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        roots = (tmp_path / "outputs",)
        assert ckpt.latest_run("latest:pretrain", roots).name == "smoke"
        assert ckpt.latest_run("best:pretrain", roots).name == "long"
    finally:
        ckpt.logger.remove(handler)
    assert "10 steps, val_loss 7.5 (2 finished pretrain run(s); best:pretrain picks" in messages[0]
    assert "2000 steps, val_loss 1.9" in messages[1]
    with pytest.raises(ckpt.ConfigError, match="best:dpo: no finished dpo run"):
        ckpt.latest_run("best:dpo", roots)
