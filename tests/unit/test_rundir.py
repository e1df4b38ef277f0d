"""A run dir has one owner: a fresh run refuses another run's dir, a lock keeps a second writer out (and dies with
its process), `overwrite=true` clears only the earlier run's artefacts, and a resume with other settings is refused."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from llm.checkpoint.checkpointer import check_same_run
from llm.errors import ConfigError
from llm.rundir import owner as rundir


def test_a_fresh_run_refuses_another_runs_dir(tmp_path):
    rundir.check_fresh(tmp_path, resume=None, overwrite=False)  # empty: fine
    (tmp_path / "checkpoints").mkdir()
    rundir.check_fresh(tmp_path, resume=None, overwrite=False)  # an empty checkpoints/ holds nothing
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(
        ConfigError,
        match=r"already holds another run's metrics.jsonl; continue that run with "
        r"resume=auto.*overwrite=true",
    ):
        rundir.check_fresh(tmp_path, resume=None, overwrite=False)
    rundir.check_fresh(tmp_path, resume="auto", overwrite=False)
    rundir.check_fresh(tmp_path, resume=None, overwrite=True)
    with pytest.raises(ConfigError, match="contradict"):
        rundir.check_fresh(tmp_path, resume="auto", overwrite=True)


def test_a_second_writer_is_refused_until_the_first_lets_go(tmp_path):
    assert not rundir.in_use(tmp_path) and not (tmp_path / rundir.LOCK_FILE).exists()  # asking creates nothing
    with rundir.claim(tmp_path):
        assert rundir.in_use(tmp_path)
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+"):
            rundir.claim(tmp_path)
    assert not rundir.in_use(tmp_path)
    rundir.claim(tmp_path).release()


def test_the_lock_dies_with_its_process(tmp_path):
    """kill -9 of the owner leaves no stale lock: the kernel drops a flock with the process (the child takes it as
    RunDirLock does, without importing torch)."""
    lock = tmp_path / rundir.LOCK_FILE
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl, time; f = open({str(lock)!r}, 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert rundir.in_use(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rundir.claim(tmp_path).release()


def test_overwrite_clears_only_the_earlier_runs_artefacts(tmp_path):
    for name in (
        "metrics.jsonl",
        "results.json",
        "sample.txt",
        "train.log",
        ".hydra/config.yaml",
        "checkpoints/step_0000002/model.safetensors",
        "tb/events",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert rundir.clear(tmp_path) == ["checkpoints", "metrics.jsonl", "results.json", "sample.txt", "tb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "train.log"]


def test_resume_refuses_other_settings():
    saved = {"seed": 1337, "trainer.batch_size": 8, "task.data": {"seq_len": 64, "source": {"max_bytes": 2}}}
    check_same_run(saved, dict(saved), "auto", "ckpt")
    check_same_run({}, saved, "auto", "ckpt")  # a checkpoint from before fingerprints: nothing to compare
    other = {**saved, "seed": 7, "task.data": {"seq_len": 64, "source": {"max_bytes": 3}}}
    with pytest.raises(
        ConfigError,
        match=r"resume=auto: ckpt was trained with other settings \(seed: checkpoint "
        r"1337 vs now 7; task.data.source.max_bytes: checkpoint 2 vs now 3\)",
    ):
        check_same_run(saved, other, "auto", "ckpt")
