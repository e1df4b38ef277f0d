"""Distributed training end to end on CPU (gloo, 2 processes): the same losses as one process for DDP and FSDP
(with and without gradient accumulation), checkpoints that resume on another number of ranks, one run dir per
run written by rank 0, and every way of starting ranks: torchrun, trainer.nproc_per_node (also inside a -m
sweep) and the submitit launcher (each task a rank, as on SLURM)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, SMALL, read_metrics, run_cli, run_env

pytestmark = pytest.mark.integration
SHARES_RUNS = pytest.mark.xdist_group("distributed")  # the tests of the module fixtures: on one worker

TOL = 1e-5
# 6 steps, a metrics line and a checkpoint every 3; the final evaluation on the same 4 x 8 validation sequences
BASE = [
    *SMALL,
    "optim=adamw",  # FSDP refuses Muon (the default); Muon's DDP is tested in tests/unit/test_muon.py
    "trainer.max_steps=6",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.save_every=3",
    "task.sample.max_new_tokens=4",
]

# torchrun runs this in place of run.py: it runs run.py as __main__ unchanged, except that rank 1 waits 1.5 s
# after joining the process group, so the two ranks compose their Hydra configs in different seconds.
SLOW_RANK = """
import os, runpy, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
from llm.dist import env as cluster
join = cluster.prepare_launch
def join_then_wait():
    join()
    if os.environ.get("RANK") == "1":
        time.sleep(1.5)
cluster.prepare_launch = join_then_wait
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}  # not step 0's evaluation


def assert_same_losses(a: Path, b: Path, steps=range(1, 7)) -> float:
    la, lb = losses(a), losses(b)
    assert all(s in la and s in lb for s in steps), (sorted(la), sorted(lb))
    delta = max(abs(la[s] - lb[s]) for s in steps)
    assert delta < TOL, {s: (la[s], lb[s]) for s in steps}
    return delta


def truncate_to_step_3(src: Path, dst: Path) -> Path:
    """A copy of a 6-step run cut back to its step-3 checkpoint (as if it had stopped there)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_0000006")
    (dst / "results.json").unlink()
    (dst / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in read_metrics(src) if m["step"] <= 3))
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def single(runs, cache_dir) -> Path:
    run_cli([*BASE, f"hydra.run.dir={runs / 'single'}"], cache_dir)
    return runs / "single"


@pytest.fixture(scope="module")
def torchrun_ddp(runs, cache_dir) -> Path:
    """torchrun, 2 ranks, DDP by default (strategy=auto), no hydra.run.dir: the run dir comes from the clock."""
    cwd = runs / "torchrun"
    cwd.mkdir()
    (cwd / "slow_rank.py").write_text(SLOW_RANK)
    env = run_env(cache_dir)
    env.pop("LLM_RUN_STAMP", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "slow_rank.py",
            str(ROOT / "run.py"),
            *BASE,
        ],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd


@pytest.fixture(scope="module")
def fsdp(runs, cache_dir) -> Path:
    run_cli([*BASE, "trainer.nproc_per_node=2", "trainer.strategy=fsdp", f"hydra.run.dir={runs / 'fsdp'}"], cache_dir)
    return runs / "fsdp"


@pytest.fixture(scope="module")
def accumulation_sweep(runs, cache_dir) -> dict[str, Path]:
    """A 2-job -m sweep, each job 2 ranks (trainer.nproc_per_node=2): DDP and FSDP (+ activation checkpointing),
    both with 2 micro-batches of 2 per rank (gradient accumulation)."""
    sweep = runs / "sweep"
    run_cli(
        [
            "-m",
            *BASE,
            "trainer.nproc_per_node=2",
            "trainer.micro_batch_size=2",
            "trainer.activation_checkpointing=true",
            "trainer.strategy=ddp,fsdp",
            f"hydra.sweep.dir={sweep}",
        ],
        cache_dir,
    )
    jobs = {}
    for job in sweep.iterdir():
        if job.is_dir() and not job.name.startswith("."):
            strategy = "fsdp" if "trainer.strategy=fsdp" in (job / ".hydra" / "overrides.yaml").read_text() else "ddp"
            jobs[strategy] = job
    return jobs


# ------------------------------------------------------------------ launch and run dir
@SHARES_RUNS
def test_torchrun_ranks_share_one_run_dir_written_by_rank_0(torchrun_ddp):
    run_dirs = list((torchrun_ddp / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs  # although rank 1 composed its config 1.5 s after rank 0
    run_dir = run_dirs[0]
    names = {p.name for p in run_dir.iterdir()}
    assert names == {
        ".hydra",
        ".lock",
        "checkpoints",
        "metrics.jsonl",
        "results.json",
        "sample.txt",
        "tb",
        "train.log",
        "train_rank1.log",
    }, names
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert len(list((run_dir / "tb").iterdir())) == 1  # one event file: rank 0's
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last", "step_0000003", "step_0000006"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 6 and results["tokens"] == 6 * 8 * 64
    assert "(2 rank(s))" in (run_dir / "train.log").read_text()
    assert "rank 1 |" in (run_dir / "train_rank1.log").read_text()


@SHARES_RUNS
def test_ddp_same_losses_as_one_process(single, torchrun_ddp):
    run_dir = next((torchrun_ddp / "outputs").glob("*/*"))
    assert_same_losses(single, run_dir)
    a, b = read_metrics(single)[-1], read_metrics(run_dir)[-1]
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=TOL)  # the same sequences, shared out over 2 ranks
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-4)


@SHARES_RUNS
def test_fsdp_same_losses_as_one_process(single, fsdp):
    assert_same_losses(single, fsdp)
    assert read_metrics(single)[-1]["val_loss"] == pytest.approx(read_metrics(fsdp)[-1]["val_loss"], abs=TOL)
    assert "(2 rank(s))" in (fsdp / "train.log").read_text() and (fsdp / "train_rank1.log").is_file()


@SHARES_RUNS
def test_gradient_accumulation_sweep_of_distributed_jobs(single, accumulation_sweep):
    assert sorted(accumulation_sweep) == ["ddp", "fsdp"]
    for strategy, job in accumulation_sweep.items():
        assert "2 micro-batch(es) of 2 per rank" in (job / "train.log").read_text(), strategy
        assert (job / "train_rank1.log").is_file() and json.loads((job / "results.json").read_text())["steps"] == 6
        assert_same_losses(single, job)


@SHARES_RUNS
def test_fsdp_checkpoint_is_the_one_process_format(single, fsdp):
    """Gathered to full tensors: the same tensor names, shapes and (nearly) values as a one-process checkpoint."""
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(single / "checkpoints" / "step_0000003" / name))
        b = load_file(str(fsdp / "checkpoints" / "step_0000003" / name))
        assert set(a) == set(b), name
        for key in a:
            assert a[key].shape == b[key].shape and torch.allclose(a[key], b[key], atol=1e-4), (name, key)
    meta = json.loads((fsdp / "checkpoints" / "step_0000003" / "optimizer.json").read_text())
    assert meta == json.loads((single / "checkpoints" / "step_0000003" / "optimizer.json").read_text())


# ------------------------------------------------------------------ resume on another number of ranks
@SHARES_RUNS
def test_ddp_checkpoint_resumes_in_one_process(torchrun_ddp, cache_dir, tmp_path):
    original = next((torchrun_ddp / "outputs").glob("*/*"))
    run_dir = truncate_to_step_3(original, tmp_path / "ddp_to_single")
    run_cli([*BASE, "resume=auto", f"hydra.run.dir={run_dir}"], cache_dir)
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1, 2, 3, 4, 5, 6]
    assert_same_losses(original, run_dir, steps=(4, 5, 6))


@SHARES_RUNS
def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(single, cache_dir, tmp_path):
    run_dir = truncate_to_step_3(single, tmp_path / "single_to_fsdp")
    run_cli(
        [*BASE, "resume=auto", "trainer.nproc_per_node=2", "trainer.strategy=fsdp", f"hydra.run.dir={run_dir}"],
        cache_dir,
    )
    assert "resumed from" in (run_dir / "train_rank1.log").read_text()
    assert_same_losses(single, run_dir, steps=(4, 5, 6))


# ------------------------------------------------------------------ clusters
def test_submitit_tasks_are_ranks(cache_dir, tmp_path):
    """hydra/launcher=submitit_local with 2 tasks: what the slurm preset does on a cluster, on this machine."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "submitit"
    run_cli(
        [
            "-m",
            *BASE,
            "trainer.max_steps=2",
            "trainer.save_every=0",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            f"hydra.sweep.dir={sweep}",
        ],
        cache_dir,
    )
    (job,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert "(2 rank(s))" in (job / "train.log").read_text() and (job / "train_rank1.log").is_file()
    assert json.loads((job / "results.json").read_text())["steps"] == 2


def test_slurm_launcher_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "--cfg",
            "hydra",
            "--resolve",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "SlurmLauncher" in proc.stdout and "tasks_per_node: 8" in proc.stdout and "partition: gpu" in proc.stdout
