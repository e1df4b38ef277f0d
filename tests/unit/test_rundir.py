"""A run dir has one owner: a fresh run refuses another run's dir, a lock keeps a second writer out (and dies with
its process), `overwrite=true` clears only the earlier run's artefacts, and a resume with other settings is refused."""

from __future__ import annotations

import re
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


@pytest.mark.parametrize("moment", ["before", "between"])
def test_the_loser_of_a_race_for_a_run_dir_is_refused_in_one_line(tmp_path, monkeypatch, capsys, moment):
    """Two runs into one hydra.run.dir: a rival (this test, through its own open of the lock file) claims the dir
    before run.py first asks whether it may write `.hydra/` there, or between that question and Hydra asking it
    again (the window a loaded machine once opened: the answers differed, and Hydra failed with
    "TypeError: expected str, bytes or os.PathLike object, not NoneType"). Whoever holds the lock first keeps the
    dir; the other gets the one-line "in use" refusal, and the refused run.py writes nothing there."""
    from omegaconf import OmegaConf

    from llm.rundir import resolvers
    from tests.cli_batch import run_once

    run_dir, rival, asked, refused = tmp_path / "run", rundir.RunDirLock(tmp_path / "run"), [], []

    def widened(*args):  # the resolver of `.hydra/`, with the rival's claim at the chosen moment
        if moment == "before" and not asked:
            rival.acquire()
        answer = resolvers.hydra_output_subdir(*args)
        if moment == "between" and not asked:
            try:
                rival.acquire()
            except ConfigError as e:  # run.py already holds the dir: the rival is the one refused
                refused.append(str(e))
        asked.append(answer)
        return answer

    OmegaConf.register_new_resolver("llm_output_subdir", widened, replace=True)
    monkeypatch.chdir(tmp_path)
    try:  # trainer.max_steps=2.5: a run that gets the dir stops at its config check, right after the claim
        result = run_once([f"hydra.run.dir={run_dir}", "trainer.max_steps=2.5", "logger=none"])
    finally:
        rival_held = rival.file is not None
        rival.release()
        OmegaConf.register_new_resolver("llm_output_subdir", resolvers.hydra_output_subdir, replace=True)
    lines = result["stderr"].strip().splitlines()
    assert "TypeError" not in result["stderr"] and lines[-1].startswith("error: "), result["stderr"]
    if rival_held:  # the rival holds the dir: run.py is refused in one line and writes nothing there
        assert result["returncode"] == 2 and len(lines) == 1
        assert re.fullmatch(rf"error: run dir {run_dir} is in use by another run \(pid \d+ .*", lines[0])
        assert not (run_dir / ".hydra").exists() and not refused
    else:  # run.py held the dir first: the rival was refused, run.py went on to its config check
        assert re.fullmatch(rf"run dir {run_dir} is in use by another run \(pid \d+ .*", refused[0])
        assert result["returncode"] == 2 and lines[-1].startswith("error: trainer.max_steps=2.5 must be an integer")
        assert (run_dir / ".hydra" / "config.yaml").is_file()
