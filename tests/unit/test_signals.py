"""Stopping on purpose, and stopping on a full disk: Ctrl-C saves and stops (exit 130) and a second one aborts; a
stop signal before the first step stops at the next check; a checkpoint that cannot be written leaves the previous
one and `last` intact; SFT from random weights is said loudly."""

from __future__ import annotations

import errno
import os
import signal

import pytest
import torch
from loguru import logger

import llm.checkpoint.files as ckpt
import llm.dist.signals as cluster
from llm.checkpoint.checkpointer import Checkpointer
from llm.dist.signals import Interrupted, Preempted, StopSignals
from llm.errors import TrainingError
from llm.model import build_gpt
from llm.tasks.source import open_source
from llm.train.optim import OptimizerConfig
from tests.conftest import compose_config


def test_ctrl_c_asks_to_save_and_a_second_one_aborts(monkeypatch):
    stop = StopSignals()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT" and stop.agreed(1, torch.device("cpu")) == StopSignals.INTERRUPT
        os.kill(os.getpid(), signal.SIGINT)  # at once: the same Ctrl-C (a launcher forwarding it to its workers)
        os.kill(os.getpid(), signal.SIGTERM)  # Ctrl-C still wins: a person asked
        assert stop.received == "SIGINT"
        monkeypatch.setattr(cluster, "ABORT_AFTER_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.parametrize(
    "signum,exception,code",
    [(signal.SIGTERM, Preempted, 75), (signal.SIGUSR1, Preempted, 75), (signal.SIGINT, Interrupted, 130)],
)
def test_a_signal_before_the_first_step_stops_at_the_next_check(signum, exception, code):
    stop = StopSignals()
    with stop.installed():
        stop.check("after building the tokenizer")  # nothing received: goes on
        os.kill(os.getpid(), signum)
        with pytest.raises(exception, match="before the first step \\(after building the model\\)") as info:
            stop.check("after building the model")
    assert info.value.exit_code == code and (exception is Interrupted) == (signum == signal.SIGINT)


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_last(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_gpt(vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, d_model=16, max_seq_len=16)
    opt = OptimizerConfig(lr=1e-2).build(model, "cpu")
    saver = Checkpointer(tmp_path)
    good = saver.save(2, model, opt, {"step": 2})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for target in ("save_model", "write_last_pointer"):  # the weights, then the very last write
        with monkeypatch.context() as m:
            m.setattr(ckpt, target, full_disk)
            with pytest.raises(TrainingError) as info:
                saver.save(4, model, opt, {"step": 4})
        path = tmp_path / "checkpoints" / "step_0000004"
        assert str(info.value) == (
            f"checkpoint {path} could not be written (No space left on device: free some space there, or write "
            f"somewhere else); the newest "
            f"complete checkpoint is {good if target == 'save_model' else path}"
        )
        assert (tmp_path / "checkpoints" / "last").read_text().strip() == "step_0000002"
        assert ckpt.is_complete(good) and not list((tmp_path / "checkpoints").glob("*.tmp"))
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == (
            ["last", "step_0000002"] if target == "save_model" else ["last", "step_0000002", "step_0000004"]
        )


def test_sft_without_init_from_warns_loudly_unless_on_purpose():
    seen = []
    handler = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    try:
        open_source(compose_config(["task=sft"]), set())
        assert len(seen) == 1 and "task=sft without init_from trains from RANDOM weights" in seen[0]
        assert "init_from=" in seen[0] and "task.allow_scratch=true" in seen[0]
        open_source(compose_config(["task=sft", "task.allow_scratch=true"]), set())
        open_source(compose_config(["task=pretrain"]), set())
        assert len(seen) == 1
    finally:
        logger.remove(handler)
