"""`python -m llm.scaling fit`: the runs, the fitted L(N, D), its residuals (printed and plotted), the constants as
JSON, and predictions for named larger configurations (a model preset or a parameter count, and a token count)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

from llm.errors import ConfigError
from llm.model import GPT, gpt_config
from llm.scaling.fit import Law, fit_law
from llm.scaling.runs import Run, collect

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


def preset_params(name: str, vocab_size: int) -> int:
    """The parameters of a model preset (conf/model/NAME.yaml) with `vocab_size` tokens, or NAME as a number."""
    try:
        return int(float(name))
    except ValueError:
        pass
    path = CONF_MODEL / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_MODEL.glob("*.yaml"))
        raise ConfigError(f"--predict {name!r}: neither a parameter count nor a model preset {known}")
    keys = {k: v for k, v in yaml.safe_load(path.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        return GPT(gpt_config(vocab_size=vocab_size, **keys)).num_params()


def parse_predict(spec: str, vocab_size: int) -> tuple[str, int, float]:
    name, sep, tokens = spec.partition(":")
    try:
        d = float(tokens)
    except ValueError:
        d = -1.0
    if not sep or d <= 0:
        raise ConfigError(f"--predict {spec!r}: expected NAME:TOKENS, e.g. 125m:2.5e9 or 3e6:1e8")
    return name, preset_params(name, vocab_size), d


def table(law: Law, runs: list[Run], title: str) -> list[dict]:
    rows = []
    print(title)
    print(f"{'run':<28}{'params':>12}{'tokens':>14}{'val_loss':>10}{'fit':>9}{'error':>9}")
    for r in runs:
        pred = law.predict(r.params, r.tokens)
        rows.append(
            {
                "run": r.name,
                "params": r.params,
                "tokens": r.tokens,
                "val_loss": r.val_loss,
                "predicted": pred,
                "relative_error": pred / r.val_loss - 1,
            }
        )
        print(
            f"{r.name:<28}{r.params:>12,}{r.tokens:>14,}{r.val_loss:>10.4f}{pred:>9.4f}{pred / r.val_loss - 1:>+9.2%}"
        )
    return rows


def plot(law: Law, fitted: list[Run], held: list[Run], path: Path) -> None:
    import matplotlib  # plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, res) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = sorted({r.params for r in fitted + held})
    colors = plt.get_cmap("viridis")([i / max(1, len(sizes) - 1) for i in range(len(sizes))])
    lo = min(r.tokens for r in fitted + held) / 1.5
    hi = max(r.tokens for r in fitted + held) * 1.5
    grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
    for n, color in zip(sizes, colors):
        ax.plot(grid, [law.predict(n, d) for d in grid], color=color, lw=1, label=f"N={n:,}")
        for group, marker in ((fitted, "o"), (held, "*")):
            pts = [r for r in group if r.params == n]
            ax.scatter(
                [r.tokens for r in pts],
                [r.val_loss for r in pts],
                color=color,
                marker=marker,
                s=60 if marker == "*" else 20,
            )
            res.scatter(
                [r.tokens for r in pts],
                [law.predict(r.params, r.tokens) / r.val_loss - 1 for r in pts],
                color=color,
                marker=marker,
                s=60 if marker == "*" else 20,
            )
    ax.set_xscale("log")
    ax.set_xlabel("tokens D")
    ax.set_ylabel("validation loss")
    ax.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    res.axhline(0, color="gray", lw=0.8)
    res.set_xscale("log")
    res.set_xlabel("tokens D")
    res.set_ylabel("predicted / measured - 1")
    res.set_title("residuals (stars: held out, not fitted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fit_command(args) -> dict:
    runs = collect(args.runs)
    held: list[Run] = []
    if args.hold_out_largest:
        largest = max(r.params for r in runs) if runs else 0
        held = [r for r in runs if r.params == largest]
        runs = [r for r in runs if r.params != largest]
    law = fit_law([r.params for r in runs], [r.tokens for r in runs], [r.val_loss for r in runs])
    print(
        f"L(N, D) = {law.E:.4g} + {law.A:.4g} / N^{law.alpha:.4f} + {law.B:.4g} / D^{law.beta:.4f}"
        f"   ({len(runs)} runs, mean Huber {law.huber:.3g})"
    )
    out = {
        "constants": {k: v for k, v in law.to_dict().items() if k != "huber"},
        "huber": law.huber,
        "fitted": table(law, runs, "fitted runs:"),
    }
    if held:
        out["held_out"] = table(law, held, "held out (the largest model, not fitted):")
        errors = [abs(row["relative_error"]) for row in out["held_out"]]
        out["held_out_mean_abs_error"] = sum(errors) / len(errors)
        print(f"held-out mean |error|: {out['held_out_mean_abs_error']:.2%}")
    out["predictions"] = []
    for spec in args.predict:
        name, n, d = parse_predict(spec, args.vocab_size)
        pred = law.predict(n, d)
        out["predictions"].append({"name": name, "params": n, "tokens": d, "val_loss": pred})
        print(f"predicted val_loss of {name} ({n:,} params) after {d:,.0f} tokens: {pred:.4f}")
    plot_path = Path(args.plot) if args.plot else Path(args.runs) / "scaling_fit.png"
    plot(law, runs, held, plot_path)
    print(f"plot: {plot_path}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"constants: {args.json}")
    if not all(math.isfinite(v) for v in out["constants"].values()):
        raise ConfigError("the fit's constants are not finite")
    return out
