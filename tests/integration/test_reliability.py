"""Reliability end to end: kill -9 then resume=auto gives a bit-identical loss trace (pretrain, SFT, DPO);
SIGTERM and Ctrl-C save and exit with the documented codes (75, 130; before the first step: nothing to save, 75);
a corrupt newest checkpoint is skipped; non-finite steps are skipped and too many in a row stop the run."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time

import pytest

import llm.checkpoint.files as ckpt
from llm.dist.signals import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from tests.conftest import SMALL, read_metrics, run_cli, start_run, wait_for_step

pytestmark = pytest.mark.integration
SHARES_REFERENCES = pytest.mark.xdist_group("reliability")  # the tests of the module fixture: on one worker

COMPARED = ("loss", "grad_norm", "lr", "val_loss", "skipped_steps", "rewards/margin", "tokens")
STEPS = ["trainer.max_steps=18", "trainer.save_every=3", "trainer.log_every=1", "trainer.eval_every=6"]
POST = [
    "trainer.seq_len=64",
    "task.data.eval_samples=8",
    "post_data.train.num_examples=300",
    "post_data.val.num_examples=8",
]


def _task_args(task: str, small_run) -> list[str]:
    if task == "pretrain":
        return []
    return [f"task={task}", f"init_from={small_run}", *POST]


def _assert_same_trace(reference, resumed):
    assert [m["step"] for m in resumed] == [m["step"] for m in reference]
    for a, b in zip(reference, resumed):
        for key in COMPARED:
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))


@pytest.fixture(scope="module")
def references(tmp_path_factory, small_run, cache_dir):
    """Uninterrupted runs, one per task."""
    out = {}
    for task in ("pretrain", "sft", "dpo"):
        run_dir = tmp_path_factory.mktemp("ref") / task
        run_cli([*SMALL, *STEPS, *_task_args(task, small_run), f"hydra.run.dir={run_dir}"], cache_dir)
        out[task] = read_metrics(run_dir)
    return out


@SHARES_REFERENCES
@pytest.mark.parametrize("task,seed", [("pretrain", 0), ("sft", 2), ("dpo", 3)])  # a random kill step per task
def test_kill_9_then_resume_is_bit_identical(task, seed, references, small_run, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, *STEPS, *_task_args(task, small_run), f"hydra.run.dir={run_dir}"]
    kill_at = random.Random(seed).randint(4, 14)
    proc = start_run(args, cache_dir)
    wait_for_step(proc, run_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists()
    run_cli([*args, "resume=auto"], cache_dir)
    _assert_same_trace(references[task], read_metrics(run_dir))


@SHARES_REFERENCES
def test_sigterm_saves_exits_75_and_resumes_identically(references, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, *STEPS, f"hydra.run.dir={run_dir}"]
    proc = start_run(args, cache_dir)
    wait_for_step(proc, run_dir, 8)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE == 75
    stopped = read_metrics(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / f"step_{stopped:07d}" / "manifest.json").exists()
    assert (run_dir / "checkpoints" / "last").read_text().strip() == f"step_{stopped:07d}"
    run_cli([*args, "resume=auto"], cache_dir)
    _assert_same_trace(references["pretrain"], read_metrics(run_dir))


def test_a_signal_before_the_first_step_exits_75_and_ctrl_c_later_saves_and_exits_130(cache_dir, tmp_path):
    """SIGTERM while the tokenizer, data and model are being made: exit 75, nothing of a run written, so the same
    command starts again; Ctrl-C in that run saves its step and exits 130 (the shell's code for Ctrl-C)."""
    run_dir = tmp_path / "run"
    args = [*SMALL, *STEPS, f"hydra.run.dir={run_dir}"]
    proc = start_run(args, cache_dir)
    deadline = time.time() + 120
    while time.time() < deadline and "instantiating tokenizer" not in _text(run_dir / "train.log"):
        time.sleep(0.01)  # the tokenizer, the data and the model are still to come
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE
    assert "SIGTERM: before the first step" in proc.stderr.read()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    proc = start_run(args, cache_dir)  # nothing of a run to refuse: the same command starts again
    wait_for_step(proc, run_dir, 4)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == INTERRUPTED_EXIT_CODE == 130
    assert "Traceback" not in proc.stderr.read()
    stopped = read_metrics(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / "last").read_text().strip() == f"step_{stopped:07d}"
    assert ckpt.is_complete(run_dir / "checkpoints" / f"step_{stopped:07d}")


def _text(path) -> str:
    return path.read_text() if path.exists() else ""


def test_corrupt_newest_checkpoint_is_skipped_on_resume(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, *STEPS, f"hydra.run.dir={run_dir}"]
    run_cli([*args, "trainer.max_steps=12"], cache_dir)  # a shorter run: checkpoints 3, 6, 9, 12
    newest = run_dir / "checkpoints" / "step_0000012" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    proc = run_cli([*args, "resume=auto", "trainer.max_steps=12"], cache_dir)
    assert "step_0000012 is incomplete or corrupt; skipping it" in proc.stderr
    assert "resumed from" in proc.stderr and "step_0000009 at step 9" in proc.stderr


def test_non_finite_steps_are_skipped_and_counted(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, "trainer.max_steps=8", "trainer.log_every=1", "trainer.save_every=6", "trainer.nan_steps=[3,4]"]
    run_cli([*args, f"hydra.run.dir={run_dir}"], cache_dir)
    metrics = {m["step"]: m for m in read_metrics(run_dir)}
    assert metrics[2]["skipped_steps"] == 0 and metrics[4]["skipped_steps"] == 2 and metrics[8]["skipped_steps"] == 2
    assert metrics[3]["loss"] == "nan" and isinstance(metrics[5]["loss"], float)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["skipped_steps"] == 2 and results["val_loss"] < results["initial_val_loss"]
    # the count survives a resume from the step-6 checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000008")
    (resumed / "results.json").unlink()
    run_cli([*args, "resume=auto", f"hydra.run.dir={resumed}"], cache_dir)
    assert read_metrics(resumed)[-1]["skipped_steps"] == 2
    assert json.loads((resumed / "results.json").read_text())["skipped_steps"] == 2


def test_too_many_consecutive_non_finite_steps_stop_the_run(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            *SMALL,
            "trainer.max_steps=20",
            "trainer.log_every=1",
            "trainer.save_every=2",
            "trainer.max_consecutive_skips=3",
            "trainer.nan_steps=[5,6,7,8,9,10]",
            f"hydra.run.dir={run_dir}",
        ],
        cache_dir,
        check=False,
    )
    assert proc.returncode == 2
    assert "3 consecutive steps had a non-finite loss" in proc.stderr.strip().splitlines()[-1]
    assert (run_dir / "checkpoints" / "step_0000004").is_dir()  # the finite checkpoints stay
