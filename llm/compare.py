"""Compare runs at a glance: one table of what differs between them and how they ended, and one plot of their
validation loss against steps, tokens and wall time.

    python -m llm.compare outputs/2026-12-06/10-00-00 outputs/2026-12-06/11-30-00   # two runs
    python -m llm.compare multirun_outputs/2026-12-06/12-00-00                      # every job of a sweep
    python -m llm.compare 'outputs/2026-12-06/*' --out cmp                         # a glob (quoted or not)

Each argument is a run dir (a dir with `.hydra/`), a dir holding run dirs (a sweep dir, `outputs/<date>/`,
`outputs/`: searched three levels down) or a glob of either. The table (printed, and written to
`<out>/compare.md`; the exact values in `compare.csv`) has a row per run: its status, the value of every override
that differs between the runs (a run that did not set one shows its composed value, or its config group's
option), then the final metrics from `results.json` — val_loss, val_bpb, the task's own (exact_match, ...), any
downstream evaluation (`eval/...`, `lm_eval/...`), steps, tokens/s, wall time. A run without `results.json`
(running, interrupted, failed) shows its last logged validation loss. `compare.png`: validation loss against
steps, tokens and wall seconds, one line per run, the legend made of the differing overrides.
Reads the run-dir contract only (`.hydra/`, `metrics.jsonl`, `results.json`); imports nothing that trains.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llm.utils.files import write_atomic

# the task's own final metrics, shown when a run has them (before the downstream `eval/...` ones)
TASK_METRICS = ("exact_match", "preference_accuracy", "reward_margin", "reward", "ppl")
EVAL_PREFIXES = ("eval/", "lm_eval/")
MAX_LEGEND = 30  # more runs than this: no legend (the table names them)
SEARCH_DEPTH = 3  # how far below a given dir run dirs are looked for (outputs/<date>/<time>)


class CompareError(Exception):
    """A bad argument: printed as one line, exit 2."""


@dataclass
class Run:
    dir: Path
    overrides: dict[str, str]  # key -> value as given on the command line (the last one wins)
    choices: dict[str, str]  # config group -> option (Hydra's runtime choices)
    config: dict
    results: dict
    status: str  # done | pruned | failed | interrupted
    evals: list[dict] = field(default_factory=list)  # step, tokens, wall_seconds, val_loss of every evaluation
    name: str = ""

    def setting(self, key: str) -> str | None:
        """The value of an override key in this run: as given, else its group's option, else the composed value."""
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return self.choices[key]
        node = self.config
        for part in key.lstrip("+~").split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return json.dumps(node) if isinstance(node, (list, dict, bool)) or node is None else str(node)  # as typed

    def final(self, key: str):
        """A final metric: results.json's, else (no results) the last logged value of a validation metric."""
        if key in self.results:
            return self.results[key]
        return self.evals[-1].get(key) if not self.results and self.evals else None


def _read_yaml(path: Path, kind: type = dict):
    """A `.hydra` file's content (missing: empty); a damaged one, or one not a YAML `kind`, is a CompareError."""
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return kind()
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8
        raise CompareError(
            f"{path}: unreadable ({str(e).splitlines()[0]}); a run dir's .hydra files are YAML"
        ) from None
    return _of_kind(value, kind, path, "YAML")


def _of_kind(value, kind: type, path: Path, fmt: str, key: str = ""):
    """`value` if it is a `kind` (None in YAML, an empty file or key: an empty one), else a CompareError naming
    the file (and key)."""
    if value is None and fmt == "YAML":
        return kind()
    if not isinstance(value, kind):
        where, names = f"{path}" + (f": {key}" if key else ""), {dict: "mapping", list: "list"}
        got = "null" if value is None else names.get(type(value), type(value).__name__)
        raise CompareError(f"{where} is a {fmt} {got}, not a {fmt} {names[kind]}: is the file damaged?")
    return value


def _finite(value) -> float | None:
    """A logged number that can be drawn (not a bool, NaN or infinite), else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def read_evals(run_dir: Path) -> list[dict]:
    """Every evaluation in metrics.jsonl: step, tokens (interpolated between logged steps when the evaluation's
    record has none), wall_seconds and the validation metrics. Torn or unreadable lines are skipped."""
    evals, logged = [], [(0, 0)]  # (step, tokens) of the training records
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] is True:
            continue
        tokens = _finite(record.get("tokens"))
        if tokens is not None:
            logged.append((record["step"], tokens))
        if _finite(record.get("val_loss")) is not None or isinstance(record.get("val_loss"), float):  # NaN: diverged
            evals.append({k: v for k, v in record.items() if k.startswith("val") and _finite(v) is not None})
            evals[-1].update(step=record["step"], tokens=tokens, wall_seconds=_finite(record.get("wall_seconds")))
            evals[-1].setdefault("val_loss", record["val_loss"])
    logged.sort()
    for e in evals:
        if e["tokens"] is None:
            e["tokens"] = _interpolate(logged, e["step"])
    return evals


def _interpolate(points: list[tuple[int, float]], step: int) -> float | None:
    before = [p for p in points if p[0] <= step]
    after = [p for p in points if p[0] >= step]
    if not after:  # past the last logged step: extrapolate at the last rate
        (s0, t0), (s1, t1) = (points[-2], points[-1]) if len(points) > 1 else ((0, 0), points[-1])
    else:
        (s0, t0), (s1, t1) = before[-1], after[0]
    return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)


def read_run(run_dir: Path) -> Run:
    """One run dir as the run-dir contract lays it out."""
    hydra = run_dir / ".hydra"
    overrides = {}
    for o in _read_yaml(hydra / "overrides.yaml", list):
        key, _, value = str(o).partition("=")
        if not key.lstrip("+~").startswith("hydra.") and key != "+trial":  # +trial: the Optuna sweeper's count
            overrides[key.lstrip("+")] = value
    node = _read_yaml(hydra / "hydra.yaml")
    for key in ("hydra", "runtime", "choices"):
        node = _of_kind(node.get(key), dict, hydra / "hydra.yaml", "YAML", key)
    choices = {k: str(v) for k, v in node.items() if not str(k).startswith("hydra")}
    path = run_dir / "results.json"
    try:
        results = _of_kind(json.loads(path.read_text(encoding="utf-8")), dict, path, "JSON")
        status = "pruned" if results.get("stopped_early") else "done"
    except (FileNotFoundError, IsADirectoryError):
        results, status = {}, "failed" if (run_dir / "error.txt").is_file() else "interrupted"
    except (OSError, ValueError) as e:  # written atomically at the end of a run: never torn, so damaged
        raise CompareError(f"{path}: not valid JSON ({str(e).splitlines()[0]}): is the file damaged?") from None
    config = _read_yaml(hydra / "config.yaml")
    return Run(run_dir, overrides, choices, config, results, status, read_evals(run_dir))


def _is_run(path: Path) -> bool:
    return (path / ".hydra").is_dir()


def find_runs(paths: list[str]) -> list[Path]:
    """The run dirs the arguments name (run dirs, dirs holding them, globs), in order, each once."""
    found: list[Path] = []
    for arg in paths:
        matches = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not matches:
            raise CompareError(f"{arg}: matches nothing")
        for match in map(Path, matches):
            if not match.is_dir():
                raise CompareError(f"{match}: not a dir (give run dirs, a sweep dir or a glob of them)")
            runs = [match] if _is_run(match) else _runs_below(match, SEARCH_DEPTH)
            if not runs and not glob.has_magic(arg):
                raise CompareError(f"{match}: no run dir there or below (a run dir holds .hydra/)")
            found += [r for r in runs if r not in found]
    if not found:
        raise CompareError(f"{' '.join(paths)}: no run dir there (a run dir holds .hydra/)")
    return found


def _job_order(path: Path):
    head = path.name.split("_")[0]
    return (0, int(head), "") if head.isdigit() else (1, 0, path.name)


def _runs_below(path: Path, depth: int) -> list[Path]:
    if depth == 0:
        return []
    runs = []
    for child in sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_job_order):
        runs += [child] if _is_run(child) else _runs_below(child, depth - 1)
    return runs


def short_values(values: list[str | None]) -> list[str]:
    """Override values for a table or legend: numbers with the fewest significant digits (3 or more) that keep
    different values different (0.0031622776601683794 -> 0.00316); anything else as it is."""
    numbers = []
    for v in values:
        try:
            numbers.append(float(v) if v is not None and not str(v).lstrip("-").isdigit() else None)
        except ValueError:
            numbers.append(None)
    distinct = {str(v) for v in values}
    for digits in range(3, 18):
        out = [f"{x:.{digits}g}" if x is not None and math.isfinite(x) else str(v) for v, x in zip(values, numbers)]
        if len(set(out)) == len(distinct):
            return [o if v is not None else "—" for o, v in zip(out, values)]
    return [str(v) for v in values]


def differing(runs: list[Run]) -> list[str]:
    """The override keys whose value is not the same in every run, in the order they were first given."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    return [k for k in keys if len({r.setting(k) for r in runs}) > 1]


def metric_columns(runs: list[Run]) -> list[str]:
    have = {k for r in runs for k in (r.results or (r.evals[-1] if r.evals else {}))}
    evals = sorted(k for k in have if k.startswith(EVAL_PREFIXES) and not k.endswith("_stderr"))
    front = [k for k in ("val_loss", "val_bpb", *TASK_METRICS) if k in have]
    return front + evals + ["steps", "tokens_per_s", "wall_seconds"]


def labels(runs: list[Run], keys: list[str]) -> list[str]:
    """Each run's legend entry: its values of the differing overrides (else its dir's name)."""
    columns = [short_values([r.setting(k) for r in runs]) for k in keys]
    return [" ".join(f"{k}={col[i]}" for k, col in zip(keys, columns)) or runs[i].name for i in range(len(runs))]


def _name(path: Path, paths: list[Path]) -> str:
    """A run's short name: its path below the dir all runs share (its own name when it is the only run)."""
    common = Path(os.path.commonpath([p.resolve() for p in paths]))
    rel = path.resolve().relative_to(common)
    parts = [re.sub(r"^(\d+)_.{16,}$", r"\1", part) for part in rel.parts]  # a sweep job: its number
    return "/".join(parts) if parts else path.resolve().name


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return "" if v is None else str(v)


def table(runs: list[Run]) -> tuple[list[str], list[list]]:
    """(header, rows): run, status, the differing overrides (short values), the final metrics (raw values)."""
    keys, metrics = differing(runs), metric_columns(runs)
    columns = [short_values([r.setting(k) for r in runs]) for k in keys]
    header = ["run", "status", *keys, *metrics]
    rows = [[r.name, r.status, *[c[i] for c in columns], *[r.final(m) for m in metrics]] for i, r in enumerate(runs)]
    return header, rows


def markdown(header: list[str], rows: list[list]) -> str:
    """A Markdown table whose columns line up in a terminal too."""
    cells = [header] + [[_cell(c).replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def plot_curves(curves: list[dict], path: Path, title: str = "", hline: tuple[float, str] | None = None) -> None:
    """Validation loss against steps, tokens and wall seconds (a panel each; a panel whose x no curve has is left
    out). curves: {label, evals, and optionally color, alpha}; `hline`: (value, label) drawn across every panel."""
    import matplotlib  # only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [(x, name) for x, name in (("step", "step"), ("tokens", "tokens"), ("wall_seconds", "wall seconds"))
          if any(e.get(x) is not None for c in curves for e in c["evals"])]  # fmt: skip
    names = [textwrap.shorten(c["label"], 110, placeholder=" ...") for c in curves] + ([hline[1]] if hline else [])
    ncol = 1 if max(map(len, names)) > 50 else 2 if len(names) < 12 else 3
    legend = 0.2 * math.ceil(len(names) / ncol) + 0.3 if len(curves) <= MAX_LEGEND else 0  # inches under the axes
    fig, axes = plt.subplots(1, len(xs), figsize=(5 * len(xs), 4 + legend), squeeze=False, sharey=True)
    values = []
    for ax, (x, name) in zip(axes[0], xs):
        for c in curves:
            points = [(e[x], e["val_loss"]) for e in c["evals"] if e.get(x) is not None]
            points = [p for p in points if _finite(p[1]) is not None]  # a diverged run's NaN: no point
            if points:
                style = {k: c[k] for k in ("color", "alpha", "linestyle") if k in c}
                ax.plot(*zip(*points), marker=".", label=c["label"], **style)
                values += [p[1] for p in points[1:] or points]
        if hline:
            ax.axhline(hline[0], color="gray", linestyle=":", label=hline[1])
        ax.set(xlabel=name, title=f"validation loss vs {name}")
        ax.grid(alpha=0.3)
        if x == "tokens":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    axes[0][0].set_ylabel("validation loss")
    if values:  # the first evaluation (step 0) is far above the rest: the axis shows the part that differs
        low, high = min(values), max(values)
        pad = 0.05 * (high - low or 1.0)
        axes[0][0].set_ylim(low - pad, high + pad)
    if title:
        fig.suptitle(title)
    if legend:  # below the panels, in the curves' order: one legend for all of them
        fig.legend(axes[0][0].get_legend_handles_labels()[0], names, loc="lower center", ncol=ncol, fontsize="small")
    fig.tight_layout(rect=(0, legend / (4 + legend), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(paths: list[str], out: Path) -> tuple[list[Run], str]:
    """Read the runs, write compare.md / .csv / .png into `out`; returns the runs and the table's Markdown."""
    dirs = find_runs(paths)
    runs = [read_run(d) for d in dirs]
    for r in runs:
        r.name = _name(r.dir, dirs)
    header, rows = table(runs)
    md = markdown(header, rows)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "compare.md", md + "\n\n" + "\n".join(f"- {r.name}: {r.dir}" for r in runs) + "\n")
    buffer = io.StringIO()
    csv.writer(buffer).writerows([[*header, "dir"], *[[*row, r.dir] for row, r in zip(rows, runs)]])
    write_atomic(out / "compare.csv", buffer.getvalue())
    keys = differing(runs)
    curves = [{"label": label, "evals": r.evals} for label, r in zip(labels(runs, keys), runs) if r.evals]
    if curves:
        plot_curves(curves, out / "compare.png")
    return runs, md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm.compare",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", help="run dirs, dirs holding run dirs (a sweep dir), or globs")
    parser.add_argument("--out", default="compare", help="dir for compare.md, compare.csv, compare.png (./compare)")
    args = parser.parse_args(argv)
    try:
        runs, md = compare(args.runs, Path(args.out))
    except (CompareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    drawn = " and compare.png" if any(r.evals for r in runs) else " (no validation loss logged: no plot)"
    print(f"\n{len(runs)} runs; written: {Path(args.out) / 'compare.md'}, compare.csv{drawn}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
