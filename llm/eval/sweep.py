"""A Hydra callback that ends every `-m` sweep with one combined table of its jobs' results in the sweep dir
(`sweep_summary.md` / `.json`), and, for length-extrapolation jobs, one plot with a line per job
(`length_eval.png` / `.md`). Registered in conf/hydra/default.yaml; Hydra calls its hooks by name."""

from __future__ import annotations

import json
from pathlib import Path

from llm.eval.length import write_table_and_plot

SCALARS = ("task", "steps", "val_loss", "initial_val_loss", "exact_match", "preference_accuracy", "reward_margin",
           "tokens_per_s", "seconds")


class SweepSummary:
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
        summarize(Path(config.hydra.sweep.dir))


def summarize(sweep_dir: Path) -> dict:
    """Collect <job dir>/results.json of every job under sweep_dir into one table (and plot)."""
    jobs = {}
    for results in sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name.split("_")[0])
                          if p.parent.name.split("_")[0].isdigit() else 0):
        job = results.parent
        overrides = (job / ".hydra" / "overrides.yaml")
        jobs[job.name] = {"results": json.loads(results.read_text()),
                          "overrides": " ".join(line.lstrip("- ").strip() for line in overrides.read_text().splitlines()
                                                if line.strip()) if overrides.exists() else ""}
    if not jobs:
        return {}
    keys = [k for k in SCALARS if any(k in j["results"] for j in jobs.values())]
    lines = ["| job | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, j in jobs.items():
        cells = [_fmt(j["results"].get(k)) for k in keys]
        lines.append(f"| {name.split('_')[0]} {j['overrides'][:80]} | " + " | ".join(cells) + " |")
    (sweep_dir / "sweep_summary.md").write_text("\n".join(lines) + "\n")
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(jobs, indent=2, default=str))
    length_jobs = {j["results"].get("method", name): j["results"] for name, j in jobs.items()
                   if "ppl_by_length" in j["results"]}
    if length_jobs:
        write_table_and_plot(length_jobs, sweep_dir, "length_eval")
    return jobs


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
