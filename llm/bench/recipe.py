"""Recipe benchmark: wall time to a target validation loss. Trains the same model on the same data under recipe
A and recipe B (each a list of `run.py` overrides), in turn, and reports for each the validation loss and bits
per byte against wall time and steps, and the wall time each needs to reach A's final validation loss.

    python -m llm.bench.recipe --rounds 2                               # the previous default recipe vs the default run
    python -m llm.bench.recipe --b "model.qk_norm=false"                # ... vs the default without QK-norm
    python -m llm.bench.recipe --common "experiment=tiny_long" --eval-every 100 \
        --a "optim=adamw model.qk_norm=false trainer.max_steps=2000 optim.lr=3e-3 optim.warmup_steps=100"

Each run is `python run.py <common> <recipe> trainer.eval_every=<n> logger=none` in its own dir under --out, so
it is exactly what a user's command does (the token cache is shared; the first run may build it: run once
before timing, or let round 1 pay it — `wall_seconds` counts from the start of the run, cache included). The
time at which a recipe reaches the target is interpolated linearly between its evaluations (`wall_seconds` of
metrics.jsonl, evaluations included for both). Rounds alternate the order (A B, then B A, ...) and every run
records /proc/loadavg before and after it: on a shared machine a round whose load changed a lot says so.
Written: `recipe_bench.md` (the table), `recipe_bench.png` (llm.compare's plot: validation loss against steps, tokens
and wall time, each recipe named by its overrides), and
`recipe_bench.json` (every evaluation of every run). Run by hand, never in the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from llm.compare import plot_curves, read_evals, short_values

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"
# The default recipe before Muon: AdamW (lr 3e-3, cosine), no QK-norm, 250 steps
PREVIOUS_DEFAULT = "optim=adamw model.qk_norm=false trainer.max_steps=250"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def start_recipe(name: str, overrides: list[str], run_dir: Path, eval_every: int, threads: int | None = None):
    """Start one training run through run.py (threads: its torch threads, else torch's default)."""
    cmd = [
        sys.executable,
        str(RUN_PY),
        *overrides,
        f"trainer.eval_every={eval_every}",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    print(f"[{name}] {shlex.join(cmd[1:])}  (load {load_average()})", flush=True)
    log = open(run_dir.with_suffix(".log"), "w")  # the child's output; closed when it ends
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    proc.log = log
    return proc


def run_recipe(name: str, overrides: list[str], run_dir: Path, eval_every: int, proc=None) -> dict:
    """One training run through run.py (or the one `proc` runs): its evaluations (step, wall_seconds,
    val_loss, val_bpb) and results."""
    load_before, started = load_average(), time.perf_counter()
    proc = proc or start_recipe(name, overrides, run_dir, eval_every)
    proc.wait()
    proc.log.close()
    if proc.returncode != 0:
        tail = run_dir.with_suffix(".log").read_text()[-3000:]
        sys.exit(f"error: recipe {name} failed (exit {proc.returncode}), {run_dir.with_suffix('.log')}:\n{tail}")
    evals = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            evals.append({k: rec.get(k) for k in ("step", "wall_seconds", "val_loss", "val_bpb")})
    results = json.loads((run_dir / "results.json").read_text())
    out = {
        "name": name,
        "overrides": overrides,
        "run_dir": str(run_dir),
        "evals": evals,
        "process_seconds": time.perf_counter() - started,
        "load_before": load_before,
        "load_after": load_average(),
        "steps": results.get("steps"),
        "tokens_per_s": results.get("tokens_per_s"),
        "sample": results.get("sample"),
    }
    print(
        f"[{name}] {out['steps']} steps, final val_loss {evals[-1]['val_loss']:.4f} at "
        f"{evals[-1]['wall_seconds']:.1f}s (load {out['load_after']})",
        flush=True,
    )
    return out


def time_to(evals: list[dict], key: str, target: float) -> tuple[float | None, float | None]:
    """(wall seconds, steps) at which `key` first reaches `target`, interpolated between evaluations; None if
    it never does."""
    prev = None
    for e in evals:
        value = e.get(key)
        if value is not None and value <= target:
            if prev is None or prev[key] is None:
                return e["wall_seconds"], e["step"]
            frac = (prev[key] - target) / max(prev[key] - value, 1e-12)
            return (
                prev["wall_seconds"] + frac * (e["wall_seconds"] - prev["wall_seconds"]),
                prev["step"] + frac * (e["step"] - prev["step"]),
            )
        prev = e
    return None, None


def seconds_per_step(evals: list[dict], last_step: float) -> float | None:
    """Wall seconds per step between the first evaluation and `last_step` (interpolated)."""
    at = next((e for e in evals if e["step"] >= last_step), None)
    if at is None or at["step"] == evals[0]["step"]:
        return None
    return (at["wall_seconds"] - evals[0]["wall_seconds"]) / (at["step"] - evals[0]["step"])


def step_ratio(a: dict, b: dict, a_steps, b_steps) -> float | None:
    """B/A as (steps to the target) x (seconds per step), both step times over the steps both recipes ran (with
    --concurrent, the span when both ran at once: the one that finishes first leaves the other the machine)."""
    span = min(a["evals"][-1]["step"], b["evals"][-1]["step"])
    sa, sb = seconds_per_step(a["evals"], span), seconds_per_step(b["evals"], span)
    if None in (sa, sb, a_steps, b_steps) or not a_steps:
        return None
    return b_steps * sb / (a_steps * sa)


def compare(a: dict, b: dict) -> dict:
    """Targets: A's final val_loss and val_bpb; each recipe's time and steps to reach them, and B/A."""
    row = {"round": a.get("round"), "load": f"{a['load_before']} -> {b['load_after']}"}
    for key in ("val_loss", "val_bpb"):
        target = a["evals"][-1].get(key)
        if target is None:
            continue
        ta, sa = time_to(a["evals"], key, target)
        tb, sb = time_to(b["evals"], key, target)
        row[key] = {
            "target": target,
            "a_seconds": ta,
            "a_steps": sa,
            "b_seconds": tb,
            "b_steps": sb,
            "ratio": tb / ta if tb is not None and ta else None,
            "step_ratio": step_ratio(a, b, sa, sb),
        }
    row["final"] = {
        r["name"]: {**r["evals"][-1], "steps": r["steps"], "tokens_per_s": r["tokens_per_s"]} for r in (a, b)
    }
    return row


def table(rows: list[dict], a: list[str], b: list[str], common: list[str]) -> str:
    fmt = lambda x, spec=".1f": "never" if x is None else format(x, spec)  # noqa: E731
    lines = [
        f"A: `{shlex.join(common + a) or '(defaults)'}`  ",
        f"B: `{shlex.join(common + b)}`",
        "",
        "| round | load (1/5/15 min) | A final val_loss / bpb (steps, s) | B final val_loss / bpb (steps, s) | "
        "B reaches A's val_loss at (steps, s) | time ratio | step x step-time ratio | "
        "B reaches A's val_bpb at (steps, s) | time ratio | step x step-time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fa, fb = r["final"]["A"], r["final"]["B"]
        cells = [str(r["round"]), r["load"]]
        for f in (fa, fb):
            cells.append(
                f"{f['val_loss']:.4f} / {fmt(f.get('val_bpb'), '.4f')} ({f['steps']}, {f['wall_seconds']:.1f})"
            )
        for key in ("val_loss", "val_bpb"):
            c = r.get(key)
            if c is None:
                cells += ["", "", ""]
                continue
            cells.append(f"{fmt(c['b_steps'], '.0f')}, {fmt(c['b_seconds'])}")
            cells.append(f"**{fmt(c['ratio'], '.2f')}**")
            cells.append(fmt(c.get("step_ratio"), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recipe_label(name: str, overrides: list[str], common: list[str]) -> str:
    """A recipe's legend entry: its name and its own overrides (values shortened as llm.compare does)."""
    own = overrides[len(common) :] if overrides[: len(common)] == common else overrides
    keys = [o.partition("=")[0] for o in own]
    values = short_values([o.partition("=")[2] if "=" in o else None for o in own])
    return f"{name}: " + (
        " ".join(k if "=" not in o else f"{k}={v}" for k, v, o in zip(keys, values, own)) or "defaults"
    )


def plot(runs: list[dict], path: Path, common: list[str] = ()) -> None:
    """llm.compare's plot of the runs: validation loss against steps and wall seconds (and tokens when the runs'
    dirs are there to read them), a recipe's rounds in one colour, its legend naming the recipe's overrides."""
    rounds = len({r["round"] for r in runs})
    curves = []
    for r in runs:
        run_dir = Path(r.get("run_dir", ""))
        evals = read_evals(run_dir) if (run_dir / "metrics.jsonl").is_file() else r["evals"]
        label = recipe_label(r["name"], r["overrides"], list(common))
        curves.append(
            {
                "label": label + (f" (round {r['round']})" if rounds > 1 else ""),
                "evals": evals,
                "color": "tab:blue" if r["name"] == "A" else "tab:orange",
                "alpha": 1.0 if r["round"] == 1 else 0.5,
            }
        )
    target = runs[0]["evals"][-1]["val_loss"]
    plot_curves(curves, path, hline=(target, "A's final val_loss (round 1)"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", default=PREVIOUS_DEFAULT, help="recipe A's overrides (default: the previous default)")
    parser.add_argument("--b", default="", help="recipe B's overrides (default: none, the default run)")
    parser.add_argument("--common", default="", help="overrides of both (model, data, experiment=...)")
    parser.add_argument("--eval-every", type=int, default=25, help="evaluate every N steps (both recipes)")
    parser.add_argument("--rounds", type=int, default=1, help="A then B, then B then A, ...")
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="run A and B at the same time, one torch thread each: on a machine shared with other "
        "work both then see the same load (the default runs them in turn with torch's threads)",
    )
    parser.add_argument("--out", default="recipe_bench", help="dir for the runs, the table and the plot")
    parser.add_argument(
        "--report",
        metavar="JSON",
        help="only write the table and plot again from an earlier run's recipe_bench.json (into --out)",
    )
    args = parser.parse_args(argv)
    if args.report:
        runs = json.loads(Path(args.report).read_text())["runs"]
        return report(runs, args, Path(args.out))
    common, recipes = shlex.split(args.common), {"A": shlex.split(args.a), "B": shlex.split(args.b)}
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: --out {out} is not empty: choose another dir or remove it")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for rnd in range(1, args.rounds + 1):
        order = ["A", "B"] if rnd % 2 else ["B", "A"]
        dirs = {name: out / f"round{rnd}_{name}" for name in order}
        procs = (
            {name: start_recipe(name, common + recipes[name], dirs[name], args.eval_every, threads=1) for name in order}
            if args.concurrent
            else {}
        )
        done = {}
        for name in order:
            done[name] = run_recipe(name, common + recipes[name], dirs[name], args.eval_every, procs.get(name))
            done[name]["round"] = rnd
            runs.append(done[name])
        print(table([compare(done["A"], done["B"])], recipes["A"], recipes["B"], common), flush=True)
    report(runs, args, out)


def report(runs: list[dict], args, out: Path) -> None:
    """The table (a row per round), the JSON of every run and the plot, into `out`."""
    common, a, b = shlex.split(args.common), shlex.split(args.a), shlex.split(args.b)
    by_round = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["name"]] = r
    rows = [compare(pair["A"], pair["B"]) for _, pair in sorted(by_round.items())]
    md = table(rows, a, b, common)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe_bench.md").write_text(md)
    (out / "recipe_bench.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=2))
    plot(runs, out / "recipe_bench.png", common)
    print(md + f"\nwritten: {out / 'recipe_bench.md'}, {out / 'recipe_bench.png'}, {out / 'recipe_bench.json'}")


if __name__ == "__main__":
    main()
