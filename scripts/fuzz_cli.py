"""Fuzz run.py with bad inputs and faults; tally how each ends. Not part of the test suite (minutes of CPU).

    python scripts/fuzz_cli.py                 # every case, 2 at a time, tally at the end
    python scripts/fuzz_cli.py --only seed -j 1

Each case runs `python run.py <small run> <overrides>` in a subprocess, on a fresh run dir or on a copy of a finished
run (made once), and is judged:
- `error`  expected: a non-zero exit whose last stderr line is `error: ...` (or Hydra's own one-line message), no
  traceback, and a finished run's files unchanged;
- `ok`     expected: exit 0 (and results.json written);
- `stop`   expected: exit 75 with a checkpoint (a signal).
Verdicts: pass, ZERO-EXIT (a failure that exited 0), TRACEBACK, DATA-LOSS (a finished run's file changed or gone),
UNEXPECTED (an `ok` case that failed, or a wrong exit code).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2", "data.max_bytes=2000000",
         "tokenizer.vocab_size=1024", "trainer.max_steps=4", "trainer.batch_size=8", "trainer.seq_len=64",
         "trainer.eval_every=0", "trainer.eval_batches=2", "trainer.log_every=1", "trainer.save_every=2",
         "trainer.progress=false", "task.sample.max_new_tokens=4", "logger=none"]


@dataclass
class Case:
    name: str
    args: list[str]
    expect: str = "error"  # error | ok | stop
    on_finished: bool = False  # run on a copy of a finished run (its files must survive)
    files: dict = field(default_factory=dict)  # name -> bytes, in the case's dir, referenced as {tmp}
    fault: str | None = None  # concurrent | sigterm_early | kill9_resume


BAD_VALUES = {  # key -> values that must each be refused with one line
    "trainer.max_steps": ["2.5", "-1", "abc", "true", "nan"],
    "trainer.batch_size": ["0", "-8", "2.5", "abc", "inf"],
    "trainer.micro_batch_size": ["3", "-1", "1.5"],
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
EXTRAPOLATION = [["extrapolation=yarn", "extrapolation.factor=nan"], ["extrapolation=yarn", "extrapolation.factor=0.5"],
                 ["extrapolation=linear", "extrapolation.factor=inf"], ["extrapolation=ntk", "extrapolation.factor=-2"],
                 ["extrapolation=yarn", "extrapolation.beta_fast=inf"]]


def cases() -> list[Case]:
    out = [Case(f"{key}={v}", [f"{key}={v}"]) for key, values in BAD_VALUES.items() for v in values]
    out += [Case(" ".join(a), a) for a in EXTRAPOLATION]
    out += [
        Case("unknown key", ["trainer.max_step=3"]), Case("unknown option", ["model=2b"]),
        Case("missing file", ["data=files", "data.paths={tmp}/missing.txt"]),
        Case("empty file", ["data=files", "data.paths={tmp}/e.txt"], files={"e.txt": b""}),
        Case("bad jsonl", ["data=files", "data.paths={tmp}/b.jsonl"], files={"b.jsonl": b'{"text": "a"}\n{oops\n'}),
        Case("non-utf8 text", ["data=files", "data.paths={tmp}/n.txt"], files={"n.txt": b"ok line\n\xff\xfe bad\n" * 50}),
        Case("non-utf8 jsonl", ["data=files", "data.paths={tmp}/n.jsonl"],
             files={"n.jsonl": b'{"text": "a"}\n{"text": "\xff"}\n'}),
        Case("json array with leading whitespace", ["data=files", "data.paths={tmp}/a.json", "tokenizer.vocab_size=300"],
             files={"a.json": b'  \n[{"text": "hello world"}, {"text": "again"}]'}),
        Case("dpo: chosen == rejected", ["task=dpo", "init_from={finished}", "post_data=files",
                                         "post_data.train.paths={tmp}/p.jsonl"],
             files={"p.jsonl": b"".join(b'{"prompt": "p%d", "chosen": "a", "rejected": "a"}\n' % i
                                        for i in range(60))}),
        Case("dpo: empty chosen list", ["task=dpo", "init_from={finished}", "post_data=files",
                                        "post_data.train.paths={tmp}/p.jsonl"],
             files={"p.jsonl": b'{"prompt": "p", "chosen": [], "rejected": "a"}\n'}),
        Case("sft: messages without an assistant", ["task=sft", "init_from={finished}", "post_data=files",
                                                    "post_data.train.paths={tmp}/m.jsonl"],
             files={"m.jsonl": b'{"messages": [{"role": "user", "content": "hi"}]}\n'}),
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
    ]
    return out


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in (".lock", "train.log")}


def _popen(args, env):
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.05)


def run_case(case: Case, base: Path, finished: Path, env: dict) -> tuple[str, str]:
    tmp = Path(tempfile.mkdtemp(dir=base))
    for name, content in case.files.items():
        (tmp / name).write_bytes(content)
    run_dir = tmp / "run"
    before = None
    if case.on_finished:
        shutil.copytree(finished, run_dir)
        before = _snapshot(run_dir)
    args = [a.replace("{tmp}", str(tmp)).replace("{finished}", str(finished)) for a in case.args]
    groups = {a.split("=")[0] for a in args if "." not in a.split("=")[0]}
    small = [o for o in SMALL if o.split(".")[0] not in groups]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir}")
    args = [*small, *args]
    if case.fault == "concurrent":
        first = _popen([*args, "trainer.max_steps=400"], env)
        _wait_for(run_dir / "metrics.jsonl")
        proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, text=True,
                              capture_output=True)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    elif case.fault in ("sigterm_early", "kill9_resume"):
        proc = _popen(args, env)
        _wait_for(run_dir / "checkpoints" / "last")
        proc.send_signal(signal.SIGTERM if case.fault == "sigterm_early" else signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if case.fault == "kill9_resume":
            proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "resume=auto"], cwd=ROOT, env=env,
                                  text=True, capture_output=True)
    else:
        proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, text=True,
                              capture_output=True)
    err = proc.stderr.strip().splitlines()
    last = err[-1] if err else ""
    if "Traceback" in proc.stderr:
        return "TRACEBACK", last
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
    if case.expect == "stop":
        ok = proc.returncode == 75 and (run_dir / "checkpoints" / "last").exists()
        return ("pass", "exit 75") if ok else ("UNEXPECTED", f"rc {proc.returncode}: {last}")
    ok = proc.returncode == 0 and (run_dir / "results.json").exists()
    return ("pass", "exit 0") if ok else ("UNEXPECTED", f"rc {proc.returncode}: {last}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", type=int, default=2, help="cases at a time")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="llm-fuzz-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "LLM_DEBUG": ""}
    env.setdefault("LLM_CACHE_DIR", str(base / "cache"))
    finished = base / "finished"
    subprocess.run([sys.executable, str(ROOT / "run.py"), *SMALL, f"hydra.run.dir={finished}"], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    todo = [c for c in cases() if args.only in c.name]
    tally: dict[str, int] = {}
    with concurrent.futures.ThreadPoolExecutor(args.j) as pool:
        futures = {pool.submit(run_case, c, base, finished, env): c for c in todo}
        for future in concurrent.futures.as_completed(futures):
            verdict, detail = future.result()
            tally[verdict] = tally.get(verdict, 0) + 1
            print(f"{verdict:10s} {futures[future].name:45s} {detail[:150]}", flush=True)
    print(f"\n{len(todo)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    shutil.rmtree(base, ignore_errors=True)
    return 0 if set(tally) <= {"pass"} else 1


if __name__ == "__main__":
    sys.exit(main())
