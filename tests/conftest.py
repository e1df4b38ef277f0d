"""Shared fixtures: configs composed with Hydra's compose API, shrunk for CPU; a session-wide token cache; a helper
that runs `run.py` in a subprocess.

The suite runs on every core (pytest-xdist, `-n auto --dist loadgroup` in pyproject.toml): the token cache and the
shared small run are made once per session and shared by the workers (under a file lock); the tests of a module
whose fixtures are expensive runs stay on one worker (`xdist_group`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

# One torch thread per process, set before torch is imported (the xdist workers and every run.py they start inherit
# it): the tests' models are tiny and xdist already gives each core a worker, so a second intra-op thread only
# waits for the first; two threads per run on 2 cores made a 20-step run take 2.4x the CPU time (12.7 s vs 5.3 s)
# and ~8x the training wall time, for the same losses. An OMP_NUM_THREADS of the caller's is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from llm.data.cache import file_lock  # noqa: E402  (imports torch)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# Overrides that make a run take seconds on 2 CPU cores: a 2-layer 64-wide model, a 1k BPE trained on ~2 MB.
SMALL = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.max_seq_len=128",
    "data.max_bytes=2000000",
    "tokenizer.vocab_size=1024",
    "trainer.max_steps=20",
    "trainer.batch_size=8",
    "trainer.seq_len=64",
    "trainer.eval_every=10",
    "trainer.eval_batches=4",
    "trainer.log_every=5",
    "trainer.progress=false",
    "task.sample.max_new_tokens=16",
    "optim.lr=1e-2",
    "optim.warmup_steps=5",
    "logger=tensorboard",
]


def compose_config(overrides=(), return_hydra_config=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def session_dir(tmp_path_factory, name: str) -> Path:
    """A dir of this test session that every xdist worker sees (a worker's basetemp is inside the session's)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token/tokenizer cache for the whole session (LLM_CACHE_DIR), so the corpus is tokenized once (the
    cache itself is safe for concurrent runs: a lock per corpus, atomic renames)."""
    path = Path(os.environ.get("LLM_TEST_CACHE_DIR") or session_dir(tmp_path_factory, "llm-cache"))
    path.mkdir(parents=True, exist_ok=True)
    os.environ["LLM_CACHE_DIR"] = str(path)
    return path


def run_env(cache_dir: Path, extra: dict | None = None) -> dict:
    """The environment of a run.py the tests start: this one's, with the test cache, no hub, W&B offline,
    unbuffered output, then `extra`."""
    return {
        **os.environ,
        "LLM_CACHE_DIR": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


def run_cli(args, cache_dir: Path, check: bool = True, timeout: int = 600, env: dict | None = None):
    """python run.py <args> in a subprocess; returns CompletedProcess (stdout+stderr as text)."""
    full_env = run_env(cache_dir, env)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=full_env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli_batch(
    arg_lists: list[list[str]], cache_dir: Path, timeout: int = 600, env: dict | None = None
) -> list[dict]:
    """`python run.py <args>` for each argument list, one after the other in one interpreter (tests/cli_batch.py):
    for runs that stop early, whose start-up (~2.5 s of CPU: torch, Hydra, the project) would cost more than the
    run, and for short runs of one test module. Returns {returncode, stdout, stderr} per run."""
    env = run_env(cache_dir, env)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cli_batch.py")],
        input=json.dumps(arg_lists),
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    results = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(results) == len(arg_lists), proc.stderr[-3000:]
    return results


def start_run(args, cache_dir: Path) -> subprocess.Popen:
    """python run.py <args> started in the background (for the tests that signal a running run); stderr piped."""
    env = run_env(cache_dir)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_run_batch(arg_lists: list[list[str]], cache_dir: Path, out: Path) -> subprocess.Popen:
    """`run_cli_batch`'s runs started in the background, their RESULT lines and stderr written to `out`: to kill
    the interpreter in its last run, which then starts warm (torch imported, its kernels run once). It runs at the
    lowest priority (nice 19), so the test polling it gets the CPU as soon as it wakes: a warm tiny run's steps take
    milliseconds, and a busy machine must not let it finish before the test's kill."""
    env = run_env(cache_dir)
    with open(out, "w") as sink:  # a file, not a pipe nobody reads while the runs fill it
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "cli_batch.py")],
            stdin=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: os.nice(19),
        )
    proc.stdin.write(json.dumps(arg_lists))
    proc.stdin.close()
    return proc


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> int:
    """Poll metrics.jsonl until a record of `step` or later exists; return the last step seen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            if lines and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        time.sleep(0.01)
    raise AssertionError("timed out")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, cache_dir) -> Path:
    """One small pretraining run through run.py, shared by the tests (and workers) that inspect its run dir."""
    run_dir = session_dir(tmp_path_factory, "small_run")
    with file_lock(run_dir.with_name("small_run.lock")):  # one worker runs it, the others wait
        if not (run_dir / "results.json").is_file():
            run_cli([*SMALL, "trainer.save_every=10", f"hydra.run.dir={run_dir}"], cache_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 300-token byte-level BPE (with the chat tokens) trained on built-in task rows in under a second."""
    from llm.data import VerifiableTasks, train_bpe
    from llm.data.sources import FileCorpus

    tmp = tmp_path_factory.mktemp("tiny_tokenizer")
    rows = [r for _, r in VerifiableTasks(num_examples=300).rows()]
    (tmp / "corpus.txt").write_text("\n".join(f"{r['prompt']} {r['response']}" for r in rows))
    return train_bpe(FileCorpus(str(tmp / "corpus.txt")), vocab_size=300, cache_dir=str(tmp / "cache"))
