"""Optimizer step-time benchmark: one training step (forward, backward, gradient clipping, optimizer step) under
optim=adamw, under optim=muon (Muon batched by matrix shape, llm.train.muon.BatchedMuon) and under torch's Muon
(torch.optim.Muon: one matrix at a time, what optim=muon ran before), each on its own copy of the same model and on
the same batch, in the same process; reported as median step times and their ratio to AdamW's.

    python -m llm.bench.optimizers                                  # model=tiny, B16 x T128, one torch thread
    python -m llm.bench.optimizers --nanogpt-char                   # nanoGPT's tinyshakespeare-char CPU dims
    python -m llm.bench.optimizers --set n_layer=8 --ns-steps 4 --repeats 5 --json opt.json

The optimizers' settings are conf/optim/adamw.yaml's and conf/optim/muon.yaml's defaults. Steps go round robin
(the order turns each step), so a change in the machine's load falls on all of them alike. With one torch thread
(the default) the step is also timed in CPU time of the thread (`time.thread_time`), which other processes on a
shared machine disturb much less than the wall clock: the ratio reported first is that one. Every repeat gives a
ratio (medians over its steps); the report shows the median and the spread (min-max) over the repeats. The
optimizer step alone is timed too (thread CPU time, inside the loop: its caches as the backward pass leaves them).
Run by hand; the suite runs it on a toy model only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from llm.bench.models import load_preset
from llm.errors import LLMError
from llm.model import build_gpt
from llm.train import LanguageModeling, MuonConfig
from llm.train.muon import MuonWithAdamW
from llm.train.optim import OptimizerConfig

# nanoGPT's "baby GPT" on a CPU (its README: config/train_shakespeare_char.py with --n_layer=4 --n_head=4
# --n_embd=128 --block_size=64 --batch_size=12 --dropout=0.0): GPT-2 blocks, the 65-character vocabulary
NANOGPT_CHAR = dict(
    n_layer=4,
    n_head=4,
    n_kv_head=4,
    d_model=128,
    max_seq_len=64,
    vocab_size=65,
    pos_emb="learned",
    norm="layernorm",
    mlp="gelu",
    bias=True,
    qk_norm=False,
)
OPTIMIZERS = ("adamw", "muon", "muon_per_matrix")


def build_optimizer(name: str, model, ns_steps: int):
    """optim=adamw's AdamW, optim=muon's Muon + AdamW, or the same with torch's per-matrix Muon in Muon's place."""
    if name == "adamw":
        return OptimizerConfig().build(model, "cpu")
    opt = MuonConfig(ns_steps=ns_steps).build(model, "cpu")
    if name == "muon_per_matrix":
        groups = [{k: v for k, v in g.items()} for g in opt.muon.param_groups]
        opt = MuonWithAdamW(torch.optim.Muon(groups), opt.adamw)
    return opt


def measure(kwargs: dict, batch_size: int, seq_len: int, steps: int, warmup: int, ns_steps: int) -> dict:
    """Median wall and thread-CPU ms of a training step under each optimizer, and the thread-CPU ms of its optimizer
    step alone, over `steps` round-robin steps."""
    models, opts = {}, {}
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        models[name] = build_gpt(**kwargs).train()
        opts[name] = build_optimizer(name, models[name], ns_steps)
    ids = torch.randint(0, kwargs["vocab_size"], (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    objective = LanguageModeling()
    wall = {n: [] for n in OPTIMIZERS}
    cpu = {n: [] for n in OPTIMIZERS}
    opt_cpu = {n: [] for n in OPTIMIZERS}  # the optimizer step alone (in the loop, its caches as training leaves them)
    for i in range(warmup + steps):
        turn = i % len(OPTIMIZERS)
        for name in OPTIMIZERS[turn:] + OPTIMIZERS[:turn]:
            model, opt = models[name], opts[name]
            w, c = time.perf_counter(), time.thread_time()
            loss, _ = objective.loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            s = time.thread_time()
            opt.step()
            e = time.thread_time()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.thread_time() - c)
                opt_cpu[name].append(e - s)
    return {
        name: {
            "wall_ms": 1000 * statistics.median(wall[name]),
            "cpu_ms": 1000 * statistics.median(cpu[name]),
            "opt_cpu_ms": 1000 * statistics.median(opt_cpu[name]),
        }
        for name in OPTIMIZERS
    }


def _at_least(low: int):
    """An argparse type: an integer >= low (else argparse's one line naming the flag, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m llm.bench.optimizers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny", help="preset name in conf/model or a path to a model yaml")
    p.add_argument("--nanogpt-char", action="store_true", help="nanoGPT's tinyshakespeare-char CPU model and batch")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model keys over the preset's")
    p.add_argument("--batch-size", type=_at_least(1), default=None, help="default 16 (--nanogpt-char: 12)")
    p.add_argument("--seq-len", type=_at_least(1), default=None, help="default: the model's max_seq_len")
    p.add_argument("--steps", type=_at_least(1), default=20, help="timed steps per optimizer per repeat")
    p.add_argument("--warmup", type=_at_least(0), default=3)
    p.add_argument(
        "--repeats", type=_at_least(1), default=3, help="each a fresh set of models; the spread is over these"
    )
    p.add_argument("--threads", type=_at_least(1), default=1, help="torch threads (1: CPU-time ratios too)")
    p.add_argument("--ns-steps", type=_at_least(1), default=MuonConfig.ns_steps, help="Muon's Newton-Schulz steps")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.json and not Path(args.json).resolve().parent.is_dir():  # found out now, not after minutes of timing
        p.error(f"--json {args.json}: {Path(args.json).resolve().parent} is not a directory")
    return args


def model_kwargs(args) -> dict:
    kwargs = NANOGPT_CHAR.copy() if args.nanogpt_char else load_preset(args.model)
    kwargs.setdefault("vocab_size", 4096)  # the default run's BPE
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. n_layer=8")
        kwargs[key] = yaml.safe_load(value)
    return {**kwargs, "dropout": 0.0}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kwargs = model_kwargs(args)
    batch_size = args.batch_size or (12 if args.nanogpt_char else 16)
    seq_len = args.seq_len or kwargs["max_seq_len"]
    try:
        build_gpt(**kwargs)  # the --set keys checked before any timing
    except LLMError as e:
        raise SystemExit(f"error: {e}") from None
    runs = [measure(kwargs, batch_size, seq_len, args.steps, args.warmup, args.ns_steps) for _ in range(args.repeats)]
    clocks = ("cpu_ms", "wall_ms") if args.threads == 1 else ("wall_ms",)
    res = {
        "model": "nanogpt-char" if args.nanogpt_char else args.model,
        "model_kwargs": kwargs,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "threads": args.threads,
        "ns_steps": args.ns_steps,
        "steps": args.steps,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "runs": runs,
    }
    for name in OPTIMIZERS:
        res.setdefault(name, {})["opt_cpu_ms"] = statistics.median(r[name]["opt_cpu_ms"] for r in runs)
        for clock in clocks:
            res[name][clock] = statistics.median(r[name][clock] for r in runs)
            if name != "adamw":
                ratios = [r[name][clock] / r["adamw"][clock] for r in runs]
                res[name][f"ratio_{clock[:-3]}"] = statistics.median(ratios)
                res[name][f"ratio_{clock[:-3]}_spread"] = [min(ratios), max(ratios)]
    report(res, clocks)
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        except OSError as e:  # the report is printed above: nothing measured is lost
            raise SystemExit(f"error: --json {args.json}: {e.strerror or e}") from None
    return res


def report(res: dict, clocks: tuple[str, ...]) -> None:
    k = res["model_kwargs"]
    print(
        f"model {res['model']} ({k['n_layer']} layers x {k['d_model']}), B{res['batch_size']} x T{res['seq_len']}, "
        f"{res['threads']} thread(s), Muon ns_steps {res['ns_steps']}, {res['steps']} steps x {res['repeats']} "
        f"repeat(s), torch {res['torch']}"
    )
    for clock in clocks:
        label = "thread CPU time" if clock == "cpu_ms" else "wall time"
        print(f"{label}: step ms (median) and ratio to AdamW (median over repeats, min-max)")
        for name in OPTIMIZERS:
            r = res[name]
            line = f"  {name:<16}{r[clock]:>9.2f} ms"
            if name != "adamw":
                lo, hi = r[f"ratio_{clock[:-3]}_spread"]
                line += f"   {r[f'ratio_{clock[:-3]}']:.3f}x ({lo:.3f}-{hi:.3f})"
            print(line)
    if "cpu_ms" in clocks:
        steps = ", ".join(f"{name} {res[name]['opt_cpu_ms']:.2f} ms" for name in OPTIMIZERS)
        print(f"the optimizer step alone (thread CPU time, median): {steps}")


if __name__ == "__main__":
    main()
