"""Fuzz run.py with bad inputs and faults; tally how each ends. Not part of the test suite (minutes of CPU).

    python scripts/fuzz_cli.py                 # every case, 2 at a time, tally at the end
    python scripts/fuzz_cli.py --only seed -j 1

Each case runs `python run.py <small run> <overrides>` in a subprocess, on a fresh run dir or on a copy of a finished
run (made once), and is judged:
- `error`  expected: a non-zero exit whose last stderr line is `error: ...` (or Hydra's own one-line message), no
  traceback, and a finished run's files unchanged;
- `ok`     expected: exit 0 (and results.json written);
- `stop`   expected: exit 75 with a checkpoint (a signal); `early`: exit 75 before the first step, no checkpoint;
  `interrupt`: exit 130 with a checkpoint (Ctrl-C); `abort`: exit 130 (a second Ctrl-C);
- `same`   expected: exit 0 and the loss trace of the uninterrupted finished run, bit for bit (a kill -9 at a
  seeded moment of data preparation or of a checkpoint write, then the same command with resume=auto).
`stderr_has` must appear in stderr (a warning that must not be silent). `damage` spoils the copy of the finished run
first (a metrics line that is not a JSON object, checkpoints that are corrupt, disagree with their config, hold a
pickle or a file that is not safetensors); its files are hashed after that. Real faults: a small tmpfs that fills
up while a checkpoint is written, a full one before the run, a file-size limit (RLIMIT_FSIZE), a complete cache on a
read-only bind mount (mounts need root: elsewhere those cases are `skipped`, with the reason).
Verdicts: pass, ZERO-EXIT (a failure that exited 0), TRACEBACK, DATA-LOSS (a finished run's file changed or gone),
SILENT (an expected warning missing), UNEXPECTED (an `ok` case that failed, or a wrong exit code), skipped.

`python scripts/fuzz_cli.py --fault <name> <run.py args>` runs run.py in this process with a fault injected (used
by the cases: `enospc`: the second checkpoint's weights hit a full disk; `kill9-ckpt-<k>`: SIGKILL at moment k of
the second checkpoint write; `kill9-eval`: SIGKILL during the final evaluation; `sigterm-eval`: SIGTERM during the
first evaluation).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
import random
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.n_kv_head=2",
    "data.max_bytes=2000000",
    "tokenizer.vocab_size=1024",
    "trainer.max_steps=4",
    "trainer.batch_size=8",
    "trainer.seq_len=64",
    "trainer.eval_every=0",
    "trainer.eval_batches=2",
    "trainer.log_every=1",
    "trainer.save_every=2",
    "trainer.progress=false",
    "task.sample.max_new_tokens=4",
    "logger=none",
]


@dataclass
class Case:
    name: str
    args: list[str]
    expect: str = "error"  # error | ok | stop
    on_finished: bool = False  # run on a copy of a finished run (its files must survive)
    files: dict = field(default_factory=dict)  # name -> bytes, in the case's dir, referenced as {tmp}
    fault: str | None = None  # concurrent | sigterm_early | kill9_resume | sigterm_prep | sigint | sigint2 | ...
    env: dict = field(default_factory=dict)  # extra environment of the case
    stderr_has: str = ""  # must appear in stderr
    fresh_cache: bool = False  # its own cache dir under {tmp}/cache (a copy of the shared one when "copy")
    damage: str = ""  # a DAMAGES entry applied to the copy of the finished run (before its files are hashed)


BAD_VALUES = {  # key -> values that must each be refused with one line
    "trainer.max_steps": ["2.5", "-1", "abc", "true", "nan"],
    "trainer.batch_size": ["0", "-8", "2.5", "abc", "inf"],
    "trainer.micro_batch_size": ["3", "-1", "1.5", "0"],
    "trainer.seq_len": ["0", "4096", "64.5"],
    "trainer.eval_every": ["-1", "1.5"],
    "trainer.eval_batches": ["0", "2.5"],
    "trainer.log_every": ["0", "nan"],
    "trainer.save_every": ["-2", "0.5"],
    "trainer.keep_last": ["-1", "0", "1.5"],
    "trainer.grad_clip": ["-1", "nan", "inf", "0", "abc"],
    "trainer.max_consecutive_skips": ["0", "1.5"],
    "trainer.device": ["tpu", "1"],
    "trainer.precision": ["fp8"],
    "trainer.strategy": ["zero3"],
    "trainer.nproc_per_node": ["0", "1.5"],
    "trainer.compile": ["maybe"],
    "trainer.progress": ["2"],
    "trainer.peak_flops": ["-1", "inf"],
    "optim.lr": ["inf", "nan", "-1e-3", "0", "abc"],
    "optim.weight_decay": ["-0.1", "nan"],
    "optim.betas": ["[0.9,1.0]", "[0.9]", "[-0.1,0.9]", "[nan,0.9]"],
    "optim.eps": ["0", "inf"],
    "optim.warmup_steps": ["-1", "2.5"],
    "optim.min_lr_ratio": ["2", "nan"],
    "optim.schedule": ["exp"],
    "model.n_layer": ["0", "2.5"],
    "model.n_head": ["5", "0"],
    "model.d_model": ["-64", "64.5"],
    "model.rope_theta": ["0", "-1", "nan"],
    "+model.norm_eps": ["0", "-1e-5", "inf"],
    "model.dropout": ["1.0", "-0.1", "nan"],
    "model.pos_emb": ["alibi"],
    "model.bias": ["maybe"],
    "seed": ["abc", "-1", "4294967296", "1.5"],
    "tokenizer.vocab_size": ["100", "1024.5"],
    "tokenizer.min_frequency": ["0"],
    "data.max_bytes": ["2.5", "0"],
    "task.data.val_fraction": ["1.5", "nan", "-0.1"],
    "task.data.split_seed": ["-1"],
    "task.sample.temperature": ["-1", "nan"],
    "task.sample.max_new_tokens": ["-1", "1.5"],
    "overwrite": ["yes"],
}
EXTRAPOLATION = [
    ["extrapolation=yarn", "extrapolation.factor=nan"],
    ["extrapolation=yarn", "extrapolation.factor=0.5"],
    ["extrapolation=linear", "extrapolation.factor=inf"],
    ["extrapolation=ntk", "extrapolation.factor=-2"],
    ["extrapolation=yarn", "extrapolation.beta_fast=inf"],
]


def cases() -> list[Case]:
    out = [Case(f"{key}={v}", [f"{key}={v}"]) for key, values in BAD_VALUES.items() for v in values]
    out += [Case(" ".join(a), a) for a in EXTRAPOLATION]
    out += [
        Case("unknown key", ["trainer.max_step=3"]),
        Case("unknown option", ["model=2b"]),
        Case("missing file", ["data=files", "data.paths={tmp}/missing.txt"]),
        Case("empty file", ["data=files", "data.paths={tmp}/e.txt"], files={"e.txt": b""}),
        Case("bad jsonl", ["data=files", "data.paths={tmp}/b.jsonl"], files={"b.jsonl": b'{"text": "a"}\n{oops\n'}),
        Case(
            "non-utf8 text", ["data=files", "data.paths={tmp}/n.txt"], files={"n.txt": b"ok line\n\xff\xfe bad\n" * 50}
        ),
        Case(
            "non-utf8 jsonl",
            ["data=files", "data.paths={tmp}/n.jsonl"],
            files={"n.jsonl": b'{"text": "a"}\n{"text": "\xff"}\n'},
        ),
        Case(
            "json array with leading whitespace",
            ["data=files", "data.paths={tmp}/a.json", "tokenizer.vocab_size=300"],
            files={"a.json": b'  \n[{"text": "hello world"}, {"text": "again"}]'},
        ),
        Case(
            "dpo: chosen == rejected",
            ["task=dpo", "init_from={finished}", "post_data=files", "post_data.train.paths={tmp}/p.jsonl"],
            files={"p.jsonl": b"".join(b'{"prompt": "p%d", "chosen": "a", "rejected": "a"}\n' % i for i in range(60))},
        ),
        Case(
            "dpo: empty chosen list",
            ["task=dpo", "init_from={finished}", "post_data=files", "post_data.train.paths={tmp}/p.jsonl"],
            files={"p.jsonl": b'{"prompt": "p", "chosen": [], "rejected": "a"}\n'},
        ),
        Case(
            "sft: messages without an assistant",
            ["task=sft", "init_from={finished}", "post_data=files", "post_data.train.paths={tmp}/m.jsonl"],
            files={"m.jsonl": b'{"messages": [{"role": "user", "content": "hi"}]}\n'},
        ),
        # the keys of the loose ends (#27): the WSD schedule under AdamW, GRPO's lengths against the context
        Case("wsd: decay_fraction above 1", ["optim.schedule=wsd", "optim.decay_fraction=1.5"]),
        Case("wsd: decay_fraction nan", ["optim.schedule=wsd", "optim.decay_fraction=nan"]),
        Case("wsd: decay_fraction a string", ["optim.schedule=wsd", "optim.decay_fraction=abc"]),
        Case("wsd: decay_shape unknown", ["optim.schedule=wsd", "optim.decay_shape=cubic"]),
        Case("adamw: schedule unknown", ["optim=adamw", "optim.schedule=wsdd"]),
        Case(
            "grpo: completion past the context",
            ["task=grpo", "init_from={finished}", "task.objective.max_new_tokens=5000"],
        ),
        Case(
            "grpo: held-out past the context",
            ["task=grpo", "init_from={finished}", "task.objective.eval_max_new_tokens=5000"],
        ),
        Case(
            "grpo: eval_max_new_tokens 0", ["task=grpo", "init_from={finished}", "task.objective.eval_max_new_tokens=0"]
        ),
        Case("missing tokenizer dir", ["tokenizer=pretrained", "tokenizer.name_or_path=/nonexistent/tok"]),
        Case("resume nonexistent", ["resume=/nonexistent/run"]),
        Case("init_from nonexistent", ["init_from=/nonexistent/run"]),
        Case("dpo without init_from", ["task=dpo"]),
        Case("unwritable output dir", ["hydra.run.dir=/proc/llm_fuzz"]),
        # run dir ownership (on a copy of a finished run)
        Case("fresh run into a finished dir", [], on_finished=True),
        Case("failing fresh run into a finished dir", ["optim.lr=nan"], on_finished=True),
        Case("resume with another seed", ["resume=auto", "seed=7"], on_finished=True),
        Case("resume with another batch", ["resume=auto", "trainer.batch_size=16"], on_finished=True),
        Case("resume with another seq_len", ["resume=auto", "trainer.seq_len=32"], on_finished=True),
        Case("resume with other data", ["resume=auto", "data.max_bytes=1000000"], on_finished=True),
        Case("resume with another tokenizer", ["resume=auto", "tokenizer.vocab_size=512"], on_finished=True),
        Case("resume and overwrite", ["resume=auto", "overwrite=true"], on_finished=True),
        Case("resume with a bad key", ["resume=auto", "trainer.keep_last=-1"], on_finished=True),
        Case("resume of a finished run", ["resume=auto"], expect="ok", on_finished=True),
        Case("overwrite a finished run", ["overwrite=true"], expect="ok", on_finished=True),
        Case("keep_last=1", ["trainer.keep_last=1"], expect="ok"),
        # faults
        Case("a second writer", [], fault="concurrent"),
        Case("SIGTERM during the run", ["trainer.max_steps=400"], expect="stop", fault="sigterm_early"),
        Case("kill -9 then resume", ["trainer.max_steps=40"], expect="ok", fault="kill9_resume"),
        Case("all steps non-finite", ["trainer.max_steps=3", "trainer.nan_steps=[1,2,3]"]),
        # caches
        Case("cache_dir is a file", ["cache_dir={tmp}/f"], files={"f": b"x"}),
        Case("cache_dir cannot be written", ["cache_dir=/proc/llm-fuzz-cache"]),
        Case("tokenizer.cache_dir is a file", ["tokenizer.cache_dir={tmp}/f"], files={"f": b"x"}),
        Case("damaged tokenizer and token caches", [], expect="ok", fault="damage_cache", stderr_has="rebuilding"),
        # the hub, offline or unreachable (one line, in seconds)
        Case("hub dataset offline", ["data=hub", "data.name=nobody/nothing"]),
        Case(
            "hub rows offline",
            ["task=sft", "init_from={finished}", "post_data=hub", "post_data.train.name=nobody/nothing"],
        ),
        Case("hub tokenizer offline", ["tokenizer=pretrained", "tokenizer.name_or_path=nobody/nothing"]),
        Case("hub model offline", ["task=sft", "init_from=nobody/nothing"]),
        Case(
            "hub unreachable",
            ["data=hub", "data.name=nobody/nothing"],
            env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"},
            stderr_has="cannot be reached",
        ),
        Case(
            "hub model unreachable",
            ["task=sft", "init_from=nobody/nothing"],
            env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"},
            stderr_has="cannot be reached",
        ),
        # signals, Ctrl-C, a full disk
        Case("SIGTERM during data preparation", [], expect="early", fault="sigterm_prep", fresh_cache=True),
        Case("SIGUSR1 during the run", ["trainer.max_steps=400"], expect="stop", fault="sigusr1"),
        Case("Ctrl-C during the run", ["trainer.max_steps=400"], expect="interrupt", fault="sigint"),
        Case("Ctrl-C twice", ["trainer.max_steps=400", "trainer.batch_size=128"], expect="abort", fault="sigint2"),
        Case("full disk while saving", [], fault="enospc", stderr_has="No space left on device"),
        Case(
            "sft from random weights",
            ["task=sft", "post_data.train.num_examples=64", "task.data.eval_samples=4", "post_data.val.num_examples=4"],
            expect="ok",
            stderr_has="RANDOM weights",
        ),
        # kill -9 at seeded moments, then resume=auto: the finished run's trace bit for bit
        *[
            Case(f"kill -9 during data preparation ({k})", [], expect="same", fault=f"kill9_prep_{k}", fresh_cache=True)
            for k in (1, 2)
        ],
        *[
            Case(f"kill -9 during a checkpoint write ({k})", [], expect="same", fault=f"kill9-ckpt-{k}")
            for k in random.Random(0).sample(range(len(CKPT_MOMENTS)), 3)
        ],
        Case("kill -9 during the final evaluation", [], expect="same", fault="kill9-eval"),
        # issue 22: library errors, real faults and corrupt files, each one line; a resume never starts over
        Case(
            "metrics.jsonl line not an object",
            ["resume=auto", "trainer.max_steps=6"],
            on_finished=True,
            damage="metrics-list",
        ),
        Case(
            "metrics.jsonl not utf-8", ["resume=auto", "trainer.max_steps=6"], on_finished=True, damage="metrics-bytes"
        ),
        Case(
            "resume=auto, every checkpoint corrupt",
            ["resume=auto", "trainer.max_steps=6"],
            on_finished=True,
            damage="ckpt-garbage",
        ),
        *[
            Case(f"{how}: {what}", [*args], on_finished=True, damage=what)
            for what in ("ckpt-config-disagrees", "ckpt-pickle", "ckpt-not-safetensors")
            for how, args in (
                ("resume", ["resume=auto", "trainer.max_steps=6"]),
                ("init_from", ["task=sft", "init_from={run}", "hydra.run.dir={tmp}/sft"]),
            )
        ],
        Case("full disk while saving (a real small tmpfs)", [], fault="tmpfs", stderr_has="No space left on device"),
        Case("full disk before the run (a full tmpfs)", [], fault="tmpfs-full", stderr_has="No space left on device"),
        Case("file-size limit while saving (ulimit -f)", [], fault="fsize", stderr_has="File too large"),
        Case(
            "post_data .parquet that is not Parquet",
            ["task=sft", "init_from={finished}", "post_data=files", "post_data.train.paths={tmp}/p.parquet"],
            files={"p.parquet": b"PAR1 this is not parquet\n" * 20},
        ),
        Case(
            "post_data.train.paths=[]",
            ["task=sft", "init_from={finished}", "post_data=files", "post_data.train.paths=[]"],
            stderr_has="post_data.train.paths",
        ),
        Case("a 300-character hydra.run.dir", ["hydra.run.dir={tmp}/" + "a" * 300]),
        Case(
            "model.max_seq_len=4e9, learned positions",
            ["model.max_seq_len=4000000000", "model.pos_emb=learned"],
            stderr_has="model.max_seq_len",
        ),
        Case("nproc_per_node=2, batch size of 7", ["trainer.nproc_per_node=2", "trainer.batch_size=7"]),
        Case(
            "nproc_per_node=2, a bad file in the workers",
            ["trainer.nproc_per_node=2", "data=files", "data.paths={tmp}/b.jsonl"],
            files={"b.jsonl": b'{"text": "a"}\n{oops\n'},
        ),
        Case("a complete cache on a read-only mount", [], expect="ok", fault="ro-cache"),
        Case(
            "a read-only cache without the entry",
            ["tokenizer.vocab_size=900"],
            fault="ro-cache",
            stderr_has="is not in the cache",
        ),
        Case("SIGTERM during the first evaluation", [], expect="same", fault="sigterm-eval"),
    ]
    return out


CKPT_MOMENTS = ("model.safetensors", "optimizer.safetensors", "trainer_state.json", "manifest", "rename", "last")


def fault_run(fault: str, argv: list[str]) -> None:
    """run.py in this process with a fault in its second checkpoint write (the first one stays complete)."""
    sys.path.insert(0, str(ROOT))  # this checkout's llm, as run.py would import it
    import llm.checkpoint.files as ckpt
    import llm.train.trainer as trainer

    evaluate, evaluations = trainer.Trainer.evaluate, []

    def faulty_evaluate(self):  # the first evaluation is before step 1, the second the final one
        evaluations.append(1)
        if fault == "sigterm-eval" and len(evaluations) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if fault == "kill9-eval" and len(evaluations) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(self)

    trainer.Trainer.evaluate = faulty_evaluate

    calls = {"n": 0}

    def at(moment: str) -> bool:
        return (
            fault == "enospc" and moment == "model.safetensors" or fault == f"kill9-ckpt-{CKPT_MOMENTS.index(moment)}"
        )

    def hit(moment: str) -> None:
        if calls["n"] == 2 and at(moment):
            if fault == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device", moment)
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(name: str, moment: str, before: bool = False):
        original = getattr(ckpt, name)

        def wrapped(*args, **kwargs):
            if name == "save_model":
                calls["n"] += 1
            if before:
                hit(moment)
            out = original(*args, **kwargs)
            if not before:
                hit(moment)
            return out

        setattr(ckpt, name, wrapped)

    wrap("save_model", "model.safetensors", before=fault == "enospc")
    wrap("save_file", "optimizer.safetensors")
    wrap("_sha256", "trainer_state.json")  # the manifest's checksums: every file is written
    wrap("fsync_dir", "manifest", before=True)  # the manifest written, before the rename
    wrap("write_last_pointer", "rename", before=True)
    wrap("write_last_pointer", "last")
    sys.argv = [str(ROOT / "run.py"), *argv]
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")


def _snapshot(run_dir: Path) -> dict:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in (".lock", "train.log")
    }


def _popen(args, env):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(path: Path, timeout: float = 120, text: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not (path.exists() and text in path.read_text(errors="replace")):
        time.sleep(0.05)


def _losses(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        (m["step"], m.get("loss"), m.get("grad_norm"), m.get("val_loss"))
        for m in map(json.loads, path.read_text().splitlines())
    ]


def _damage_caches(cache: Path) -> None:
    for tokenizer_json in cache.glob("tokenizers/*/tokenizer.json"):
        tokenizer_json.write_bytes(tokenizer_json.read_bytes()[:500])
    for meta in cache.glob("data/*/meta.json"):
        meta.write_bytes(meta.read_bytes()[:40])


def _remanifest(step_dir: Path) -> None:
    """A checkpoint's manifest made to match its files again: a checkpoint complete in form, wrong in content."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _damage_checkpoints(run_dir: Path, how: str) -> None:
    for step_dir in sorted((run_dir / "checkpoints").glob("step_*")):
        if how == "ckpt-garbage":  # every checkpoint fails its checksum
            (step_dir / "model.safetensors").write_bytes(os.urandom(1000))
            continue
        if how == "ckpt-config-disagrees":
            config = json.loads((step_dir / "model_config.json").read_text())
            (step_dir / "model_config.json").write_text(json.dumps({**config, "vocab_size": 2048}))
        elif how == "ckpt-pickle":  # a PyTorch pickle instead of our files
            for path in list(step_dir.iterdir()):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            (step_dir / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00." + os.urandom(500))
        elif how == "ckpt-not-safetensors":
            (step_dir / "model.safetensors").write_bytes(b"\xff" * 1000)
        _remanifest(step_dir)


DAMAGES = {
    "metrics-list": lambda run: run.joinpath("metrics.jsonl").open("a").write("[1, 2]\n"),
    "metrics-bytes": lambda run: run.joinpath("metrics.jsonl").open("ab").write(b'{"step": 5, "x": "\xff"}\n'),
    **{k: (lambda run, k=k: _damage_checkpoints(run, k)) for k in ("ckpt-garbage", "ckpt-config-disagrees")},
    **{k: (lambda run, k=k: _damage_checkpoints(run, k)) for k in ("ckpt-pickle", "ckpt-not-safetensors")},
}


def _mount(target: Path, *options: str) -> str:
    """mount(8) with `options`; '' when done, else why not (not root, no mount namespace: the case is skipped)."""
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    return "" if proc.returncode == 0 else f"cannot mount ({proc.stderr.strip() or proc.returncode})"


def _mount_fault(case: Case, tmp: Path, finished: Path, env: dict) -> tuple[str, list[Path]]:
    """The real filesystem a fault case runs on: a small tmpfs that fills up, a full one, a cache made read-only
    by a bind mount. Returns (why it cannot be made, or ''; the mounts to undo)."""
    mnt = tmp / "mnt"
    if case.fault == "tmpfs":  # the first checkpoint fits, the second one's weights do not
        first = sum(p.stat().st_size for p in (finished / "checkpoints" / "step_0000002").rglob("*") if p.is_file())
        return _mount(mnt, "-t", "tmpfs", "-o", f"size={(first + 400_000) // 1024}k", "tmpfs"), [mnt]
    if case.fault == "tmpfs-full":
        why = _mount(mnt, "-t", "tmpfs", "-o", "size=64k", "tmpfs")
        if not why:
            with open(mnt / "filler", "wb") as f:
                with contextlib.suppress(OSError):
                    f.write(b"\0" * 100_000)
        return why, [mnt]
    if case.fault == "ro-cache":
        why = _mount(mnt, "--bind", env["LLM_CACHE_DIR"]) or _mount(mnt, "-o", "remount,ro,bind")
        env["LLM_CACHE_DIR"] = str(mnt)
        return why, [mnt]
    return "", []


def _fsize_limit() -> None:  # in the child: writes past 1000 KiB fail with EFBIG (Python ignores SIGXFSZ)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def run_case(case: Case, base: Path, finished: Path, env: dict) -> tuple[str, str]:
    tmp = Path(tempfile.mkdtemp(dir=base))
    env = {**env, **case.env}
    why, mounts = _mount_fault(case, tmp, finished, env)
    try:
        if why:
            return "skipped", why
        return _run_case(
            case, tmp, finished, env, tmp / "mnt" / "run" if (case.fault or "").startswith("tmpfs") else None
        )
    finally:
        for mnt in mounts:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _run_case(case: Case, tmp: Path, finished: Path, env: dict, run_dir: Path | None) -> tuple[str, str]:
    for name, content in case.files.items():
        (tmp / name).write_bytes(content)
    run_dir = run_dir or tmp / "run"
    before = None
    if case.on_finished:
        shutil.copytree(finished, run_dir)
        if case.damage:
            DAMAGES[case.damage](run_dir)
        before = _snapshot(run_dir)
    args = [
        a.replace("{tmp}", str(tmp)).replace("{finished}", str(finished)).replace("{run}", str(run_dir))
        for a in case.args
    ]
    if case.fresh_cache or case.fault == "damage_cache":
        if case.fault == "damage_cache":
            shutil.copytree(env["LLM_CACHE_DIR"], tmp / "cache", ignore=shutil.ignore_patterns("*.lock"))
            _damage_caches(tmp / "cache")
        env["LLM_CACHE_DIR"] = str(tmp / "cache")
    groups = {a.split("=")[0] for a in args if "." not in a.split("=")[0]}
    small = [o for o in SMALL if o.split(".")[0] not in groups]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir}")
    args = [*small, *args]
    if case.fault == "concurrent":
        first = _popen([*args, "trainer.max_steps=400"], env)
        _wait_for(run_dir / "metrics.jsonl")
        proc = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, text=True, capture_output=True
        )
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    elif case.fault == "sigterm_prep":
        proc = _popen(args, env)
        _wait_for(run_dir / "train.log", text="instantiating tokenizer")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    elif case.fault in ("sigusr1", "sigint", "sigint2"):
        proc = _popen(args, env)
        _wait_for(run_dir / "metrics.jsonl", text='"step": 2')
        proc.send_signal(signal.SIGUSR1 if case.fault == "sigusr1" else signal.SIGINT)
        if case.fault == "sigint2":
            time.sleep(1.5)  # a person's second Ctrl-C (sooner is taken for the same one)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    elif case.fault and case.fault.startswith(("kill9_prep", "kill9-ckpt", "enospc", "kill9-eval", "sigterm-eval")):
        if case.fault.startswith("kill9_prep"):
            first = subprocess.run(
                [sys.executable, str(ROOT / "run.py"), *args],
                cwd=ROOT,
                text=True,
                capture_output=True,
                env={**env, "LLM_PREPARE_KILL_AFTER": case.fault[-1]},
            )
        else:
            first = subprocess.run(
                [sys.executable, __file__, "--fault", case.fault, *args],
                cwd=ROOT,
                env=env,
                text=True,
                capture_output=True,
            )
        proc = first
        if case.expect == "same":
            if first.returncode != (75 if case.fault == "sigterm-eval" else -9):
                return "UNEXPECTED", f"the fault did not stop it (rc {first.returncode}): {first.stderr[-300:]}"
            proc = subprocess.run(
                [sys.executable, str(ROOT / "run.py"), *args, "resume=auto"],
                cwd=ROOT,
                env=env,
                text=True,
                capture_output=True,
            )
    elif case.fault in ("sigterm_early", "kill9_resume"):
        proc = _popen(args, env)
        _wait_for(run_dir / "checkpoints" / "last")
        proc.send_signal(signal.SIGTERM if case.fault == "sigterm_early" else signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if case.fault == "kill9_resume":
            proc = subprocess.run(
                [sys.executable, str(ROOT / "run.py"), *args, "resume=auto"],
                cwd=ROOT,
                env=env,
                text=True,
                capture_output=True,
            )
    else:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), *args],
            cwd=ROOT,
            env=env,
            text=True,
            capture_output=True,
            preexec_fn=_fsize_limit if case.fault == "fsize" else None,
        )
    err = proc.stderr.strip().splitlines()
    last = err[-1] if err else ""
    if "Traceback" in proc.stderr:
        return "TRACEBACK", last
    if case.stderr_has and case.stderr_has not in proc.stderr:
        return "SILENT", f"no {case.stderr_has!r} in stderr (rc {proc.returncode}): {last}"
    if before is not None and case.expect == "error":
        after = _snapshot(run_dir)
        lost = [k for k in before if after.get(k) != before[k]]
        if lost:
            return "DATA-LOSS", f"changed: {lost[:3]}"
    if case.expect == "error":
        if "missing field" in last and "array" in case.name:  # a valid JSON array read as JSONL
            return "UNEXPECTED", last
        if proc.returncode == 0:
            return "ZERO-EXIT", last
        if not (last.startswith("error: ") or "Could not" in proc.stderr or "Error" in last):
            return "UNEXPECTED", f"rc {proc.returncode}: {last}"
        return "pass", last
    if case.expect == "abort":  # at once (130), or while it was already exiting after the first (-2: SIGINT)
        ok = proc.returncode in (130, -2)
        return ("pass", f"exit {proc.returncode}: {last}") if ok else ("UNEXPECTED", f"rc {proc.returncode}: {last}")
    if case.expect in ("stop", "interrupt", "early"):
        code = 75 if case.expect in ("stop", "early") else 130
        saved = (run_dir / "checkpoints" / "last").exists()
        ok = proc.returncode == code and saved == (case.expect in ("stop", "interrupt"))
        return (
            ("pass", f"exit {code}: {last}") if ok else ("UNEXPECTED", f"rc {proc.returncode}, saved {saved}: {last}")
        )
    if case.expect == "same":
        same = proc.returncode == 0 and _losses(run_dir) == _losses(finished) != []
        return ("pass", "resumed bit for bit") if same else ("UNEXPECTED", f"rc {proc.returncode}: {last}")
    ok = proc.returncode == 0 and (run_dir / "results.json").exists()
    return ("pass", "exit 0") if ok else ("UNEXPECTED", f"rc {proc.returncode}: {last}")


def main() -> int:
    if sys.argv[1:2] == ["--fault"]:
        fault_run(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", type=int, default=2, help="cases at a time")
    parser.add_argument("--only", default="", help="run only the cases whose name contains one of these ('|' between)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="llm-fuzz-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "LLM_DEBUG": ""}
    env.setdefault("LLM_CACHE_DIR", str(base / "cache"))
    finished = base / "finished"
    subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *SMALL, f"hydra.run.dir={finished}"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    todo = [c for c in cases() if any(part in c.name for part in args.only.split("|"))]
    tally: dict[str, int] = {}
    with concurrent.futures.ThreadPoolExecutor(args.j) as pool:
        futures = {pool.submit(run_case, c, base, finished, env): c for c in todo}
        for future in concurrent.futures.as_completed(futures):
            verdict, detail = future.result()
            tally[verdict] = tally.get(verdict, 0) + 1
            print(f"{verdict:10s} {futures[future].name:45s} {detail[:150]}", flush=True)
    print(f"\n{len(todo)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    shutil.rmtree(base, ignore_errors=True)
    return 0 if set(tally) <= {"pass", "skipped"} else 1


if __name__ == "__main__":
    sys.exit(main())
