"""The summary a sweep is decided from, and the Hydra callback that writes it at the end of every `-m` run.

Every job dir under the sweep dir is one row: its overrides; its status — `done` (results.json), `pruned`
(results.json says `stopped_early`: the Optuna sweeper's pruner gave up on it; its dir and checkpoint are kept),
`failed` (error.txt holds its one-line error) or `interrupted` (started, not finished: the same command again
continues it); the objective (`optimized_metric`, val_loss by default) and the other final metrics; steps, wall
time, tokens/s and its dir. Rows are sorted by the objective, best first and marked. Written to the sweep dir as
`sweep_summary.md` / `.csv` / `.json` and `sweep.png` (the objective against each swept numeric parameter, and the
validation curves of all jobs), plus `length_eval.*` for length evaluations.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from llm.compare import read_evals, short_values
from llm.eval.length import write_table_and_plot
from llm.utils.files import write_atomic

ERROR_FILE = "error.txt"  # a failed sweep job's one-line error, in its dir
# higher is better for these; every other metric (losses, perplexities) is minimised
MAXIMIZED = {"exact_match", "preference_accuracy", "reward_margin", "accuracy", "passkey", "tokens_per_s", "mfu"}
# and the downstream evaluations' accuracies (conf/evals/: eval/<task>/acc, ..., eval/core); their bpb is minimised
HIGHER_ENDINGS = ("accuracy", "exact_match", "/acc", "/acc_norm", "/acc_tok", "/centered", "eval/core")
METRICS = ("val_loss", "val_bpb", "train_loss", "exact_match", "preference_accuracy", "reward_margin")


@dataclass
class Job:
    name: str
    dir: str
    overrides: list[str]
    status: str  # done | pruned | failed | interrupted
    objective: float | None = None
    error: str | None = None
    results: dict = field(default_factory=dict)
    best: bool = False

    @property
    def params(self) -> dict[str, str]:
        return dict(o.split("=", 1) for o in self.overrides if "=" in o)


def direction_of(metric: str, declared: str | None = None) -> str:
    """'minimize' or 'maximize': as declared (the Optuna sweeper's `direction`), else from the metric's name."""
    if declared in ("minimize", "maximize"):
        return declared
    return "maximize" if metric in MAXIMIZED or metric.endswith(HIGHER_ENDINGS) else "minimize"


def read_job(job_dir: Path, metric: str) -> Job:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in yaml.safe_load(overrides_file.read_text()) or []] if overrides_file.is_file() else []
    results, error = {}, None
    try:
        results = json.loads((job_dir / "results.json").read_text())
        status = "pruned" if results.get("stopped_early") else "done"  # a sweep's pruner stopped it early
    except (OSError, ValueError):
        error_file = job_dir / ERROR_FILE
        status = "failed" if error_file.is_file() else "interrupted"
        error = error_file.read_text().strip() if error_file.is_file() else None
    value = results.get(metric)
    objective = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    return Job(job_dir.name, str(job_dir), overrides, status, objective, error, results)


def _job_number(path: Path) -> int:
    head = path.name.split("_")[0]
    return int(head) if head.isdigit() else 0


def read_jobs(sweep_dir: Path, metric: str = "val_loss", direction: str = "minimize") -> list[Job]:
    """The sweep's jobs, best first (jobs without a finite objective last, in job order); the best is marked."""
    dirs = sorted((p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()), key=_job_number)
    jobs = [read_job(d, metric) for d in dirs]
    sign = -1 if direction == "maximize" else 1
    jobs.sort(key=lambda j: (j.objective is None, sign * j.objective if j.objective is not None else 0))
    if jobs and jobs[0].objective is not None:
        jobs[0].best = True
    return jobs


def summarize(
    sweep_dir: Path, metric: str = "val_loss", direction: str | None = None, log_params: tuple[str, ...] = ()
) -> dict:
    """Write the summary files of `sweep_dir` and return what they hold. `log_params`: parameters searched on a
    log scale (a log axis in sweep.png; otherwise chosen when a positive parameter spans a factor of 10)."""
    sweep_dir = Path(sweep_dir)
    direction = direction_of(metric, direction)
    jobs = read_jobs(sweep_dir, metric, direction)
    counts = {s: sum(j.status == s for j in jobs) for s in ("done", "pruned", "failed", "interrupted")}
    summary = {
        "metric": metric,
        "direction": direction,
        "counts": counts,
        "best": next((asdict(j) for j in jobs if j.best), None),
        "jobs": [asdict(j) for j in jobs],
    }
    if not jobs:
        return summary
    swept = sorted({k for j in jobs for k in j.params if len({i.params.get(k) for i in jobs}) > 1} - {"+trial"})
    metrics = [m for m in METRICS if m != metric and any(m in j.results for j in jobs)]
    header = ["", "job", "status", metric, *swept, *metrics, "steps", "wall_s", "tokens_per_s", "dir", "error"]
    rows = [
        [
            "best" if j.best else "",
            j.name.split("_")[0],
            j.status,
            j.objective,
            *[j.params.get(k) for k in swept],
            *[j.results.get(m) for m in metrics],
            j.results.get("steps"),
            j.results.get("wall_seconds"),
            j.results.get("tokens_per_s"),
            j.dir,
            j.error,
        ]
        for j in jobs
    ]
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = [
        f"Sweep of {len(jobs)} jobs, sorted by {metric} ({direction}): "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        "",
        "| " + " | ".join(header[:-2]) + " | error |",
        "|---" * (len(header) - 1) + "|",
    ]
    for row in rows:
        cells = [_fmt(c) for c in row[:-2]] + [_fmt(row[-1])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    write_atomic(sweep_dir / "sweep_summary.md", "\n".join(lines) + "\n")
    write_atomic(sweep_dir / "sweep_summary.json", json.dumps(summary, indent=2, default=str))
    plot_sweep(jobs, swept, metric, sweep_dir / "sweep.png", set(log_params))
    length_jobs = {j.results.get("method", j.name): j.results for j in jobs if "ppl_by_length" in j.results}
    if length_jobs:
        write_table_and_plot(length_jobs, sweep_dir, "length_eval")
    return summary


def _numeric(values: list[str | None]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _val_curve(job: Job) -> tuple[list[int], list[float]]:
    """The job's validation losses by step, as llm.compare reads them (torn or foreign lines skipped, a diverged
    run's NaN left out of the plot)."""
    evals = [e for e in read_evals(Path(job.dir)) if math.isfinite(e["val_loss"])]
    return [e["step"] for e in evals], [e["val_loss"] for e in evals]


def plot_sweep(jobs: list[Job], swept: list[str], metric: str, path: Path, log_params: set[str]) -> None:
    """The objective against each swept numeric parameter (one panel each), and every job's validation curve."""
    import matplotlib  # plotting only: not imported by runs that draw nothing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scored = [j for j in jobs if j.objective is not None]
    numeric = [k for k in swept if _numeric([j.params.get(k) for j in scored])]
    fig, axes = plt.subplots(1, len(numeric) + 1, figsize=(5 * (len(numeric) + 1), 4), squeeze=False)
    for ax, key in zip(axes[0], numeric):
        xs = _numeric([j.params.get(key) for j in scored])
        for pruned in (False, True):  # a pruned trial's objective is from before its end: a hollow marker
            points = [(x, j) for x, j in zip(xs, scored) if (j.status == "pruned") == pruned]
            if points:
                colors = ["tab:red" if j.best else "tab:blue" for _, j in points]
                ax.scatter(
                    [x for x, _ in points],
                    [j.objective for _, j in points],
                    **({"facecolors": "none", "edgecolors": colors} if pruned else {"c": colors}),
                    label="pruned" if pruned else None,
                )
        if key in log_params or (min(xs) > 0 and max(xs) / min(xs) >= 10):
            ax.set_xscale("log")
            _log_ticks(ax.xaxis, sorted(set(xs)), matplotlib.ticker)
        else:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.tick_params(axis="x", labelrotation=30)
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key} (red: best)")
        ax.grid(alpha=0.3)
        if any(j.status == "pruned" for j in scored):
            ax.legend(fontsize="small")
    curves = axes[0][-1]
    values = {k: dict(zip([j.name for j in jobs], short_values([j.params.get(k) for j in jobs]))) for k in swept}
    for job in jobs:
        steps, losses = _val_curve(job)
        if steps:
            label = " ".join(f"{k}={values[k][job.name]}" for k in swept) or job.name
            pruned = job.status == "pruned"
            curves.plot(
                steps,
                losses,
                marker=".",
                label=("* " if job.best else "")
                + textwrap.shorten(label, 60, placeholder=" ...")
                + (" (pruned)" if pruned else ""),
                linewidth=2.5 if job.best else 1.0,
                linestyle="--" if pruned else "-",
            )
    curves.set(xlabel="step", ylabel="val_loss", title="validation curves")
    curves.grid(alpha=0.3)
    if curves.lines and len(curves.lines) <= 12:
        curves.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_ticks(axis, values: list[float], ticker) -> None:
    """A log axis labelled at the swept values themselves (up to 6 of them; more: 5 ticks evenly spaced on the log
    scale between the smallest and the largest), with short labels and no minor-tick labels (matplotlib's default
    labels 2x10^-3, 3x10^-3, ... of a narrow span on top of each other)."""
    low, high = values[0], values[-1]
    ticks = values if len(values) <= 6 else [low * (high / low) ** (i / 4) for i in range(5)]
    axis.set_major_locator(ticker.FixedLocator(ticks))
    axis.set_major_formatter(ticker.FixedFormatter(short_values([repr(v) for v in ticks])))
    axis.set_minor_formatter(ticker.NullFormatter())


def _fmt(v) -> str:
    """A table cell: numbers (also numeric override values) to 4 significant digits."""
    if isinstance(v, str) and v.replace(".", "", 1).replace("e-", "", 1).replace("-", "", 1).isdigit() and "." in v:
        v = float(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


class SweepFailed(SystemExit):
    """How a sweep some of whose jobs failed ends: after its summary, the process exits 2 (run.py's code for an
    error), so a script or CI sees the failures although the sweep went on past them."""

    def __init__(self, failed: int):
        super().__init__(2)
        self.failed = failed


def write_summary(config) -> int:
    """The summary of the sweep `config` (the Hydra config of a -m run) describes, written to its sweep dir, and
    one line saying where it is; returns how many jobs failed."""
    sweeper = config.hydra.get("sweeper") or {}
    metric = config.get("optimized_metric") or "val_loss"
    spaces = {
        **(sweeper.get("params") or {}),
        **dict(str(o).split("=", 1) for o in config.hydra.overrides.task if "=" in str(o)),
    }
    log_params = tuple(k for k, v in spaces.items() if "tag(log" in str(v).replace(" ", ""))
    summary = summarize(Path(config.hydra.sweep.dir), metric, sweeper.get("direction"), log_params)
    failed = summary["counts"].get("failed", 0)
    best = summary["best"]
    line = f"sweep summary: {Path(config.hydra.sweep.dir) / 'sweep_summary.md'} ({len(summary['jobs'])} jobs"
    line += f"; best: job {best['name'].split('_')[0]}, {metric} {best['objective']:.4g}" if best else ""
    line += f"; {failed} failed)" if failed else ")"
    print(line, file=sys.stderr)
    transfer = mup_transfer(Path(best["dir"]), config.get("mup_target_width")) if best else None
    if transfer:
        summary["mup_transfer"] = transfer
        write_atomic(Path(config.hydra.sweep.dir) / "sweep_summary.json", json.dumps(summary, indent=2, default=str))
        print(transfer["line"], file=sys.stderr)
    return failed


def mup_transfer(job_dir: Path, target_width: int | None) -> dict | None:
    """For a sweep run under µP (model.parametrization=mup): the overrides that train a model of `target_width` with
    the best job's learning rates (µP's per-group multipliers move each parameter's lr with the width ratio to
    model.base_width, so the lrs themselves carry over). None when the best job is not µP or has no config."""
    try:
        cfg = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    model, optim = cfg.get("model") or {}, cfg.get("optim") or {}
    if model.get("parametrization") != "mup":
        return None
    width = model.get("d_model")
    base = model.get("base_width") or width
    lrs = {f"optim.{k}": optim[k] for k in ("lr", "adam_lr") if isinstance(optim.get(k), (int, float))}
    overrides = [f"model.d_model={target_width or width}", "model.parametrization=mup", f"model.base_width={base}"]
    overrides += [f"{k}={v:.4g}" for k, v in lrs.items()]
    line = (
        f"µP: the lr found at width {width} for width {target_width or width}: "
        + " ".join(overrides)
        + f" (hidden matrices then train at {base / (target_width or width):.3g} x optim.lr under AdamW, "
        f"{(base / (target_width or width)) ** 0.5:.3g} x under Muon's match_rms_adamw)"
    )
    return {"width": width, "target_width": target_width or width, "overrides": overrides, "line": line}


class SweepSummary:
    """Registered in conf/hydra/default.yaml; Hydra calls its hooks by name. After a sweep it writes the summary
    and prints where it is; when jobs failed, the process then exits 2 (`SweepFailed`)."""

    def on_run_start(self, config, **kwargs) -> None:
        pass

    def on_run_end(self, config, **kwargs) -> None:
        pass

    def on_multirun_start(self, config, **kwargs) -> None:
        pass

    def on_job_start(self, config, **kwargs) -> None:
        pass

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        pass

    def on_multirun_end(self, config, **kwargs) -> None:
        failed = write_summary(config)
        if failed:  # the last thing Hydra does for a sweep: run.py's `finally` still runs
            raise SweepFailed(failed)
