"""Learning-rate transfer across width: does the best lr found at width 64 stay best at 512? (µP's figure 1)

    python -m llm.bench.lr_transfer --out lr/                          # the full grid (hours on 2 shared cores)
    python -m llm.bench.lr_transfer --out lr/ --widths 64 128 --optims adamw --seeds 0 --steps 20   # a smoke run

For each optimizer (AdamW; Muon, whose one lr is also its AdamW part's), parametrization (SP; µP with base width
the smallest width, where it is SP exactly, so that width is trained once), width (fixed depth `--layers` and head
count, so the head width grows), lr on a grid of powers of 2 and seed, a model trains `--steps` steps of
`--batch` x `--seq` bytes of Python source (the interpreter's own standard library, byte-level: 256 tokens, no
download) at a constant lr after a short warmup, then decays linearly to 0 over the last quarter (WSD), and its
validation loss on held-out files is recorded. Each finished run is appended to `runs.jsonl` in --out, so an
interrupted benchmark continues where it stopped. Writes `lr_transfer.png` (validation loss against lr, one line
per width, a panel per optimizer and parametrization) and `lr_transfer.json` (the best lr per width and how many
grid steps it moves from the smallest width to the largest).
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch

from llm.model import GPT, GPTConfig
from llm.train.muon import MuonConfig
from llm.train.optim import OptimizerConfig, set_lrs

LR_GRID = {"adamw": [2.0**k for k in range(-12, -4)], "muon": [2.0**k for k in range(-10, -2)]}


def corpus(max_bytes: int = 4_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) byte tensors: the standard library's .py files in sorted order, every 10th file held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        (val if i % 10 == 9 else train).extend(path.read_bytes())
        if len(train) + len(val) >= max_bytes:
            break
    return torch.tensor(list(train), dtype=torch.long), torch.tensor(list(val), dtype=torch.long)


def windows(data: torch.Tensor, n: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """`n` random windows [n, seq + 1] of `data`."""
    starts = torch.randint(0, data.numel() - seq - 1, (n,), generator=g)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


def build(width: int, parametrization: str, base_width: int, args, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(
            vocab_size=256,
            n_layer=args.layers,
            n_head=args.heads,
            n_kv_head=args.heads,
            d_model=width,
            ffn_hidden=3 * width,
            max_seq_len=args.seq,
            qk_norm=True,
            parametrization=parametrization,
            base_width=base_width,
        )
    )


def optim_config(name: str, lr: float, steps: int):
    schedule = {"warmup_steps": max(1, steps // 10), "schedule": "wsd", "decay_fraction": 0.25, "min_lr_ratio": 0.0}
    if name == "muon":
        return MuonConfig(lr=lr, adam_lr=lr, weight_decay=0.0, **schedule)
    return OptimizerConfig(lr=lr, weight_decay=0.0, **schedule)


def train_one(width, parametrization, optim, lr, seed, args, data) -> float:
    """The validation loss (nats per byte) after `args.steps` steps; inf when the run diverged."""
    train, val = data
    model = build(width, parametrization, min(args.widths), args, seed)
    config = optim_config(optim, lr, args.steps)
    opt = config.build(model, "cpu")
    peaks = [g["lr"] for g in opt.param_groups]
    g = torch.Generator().manual_seed(1000 + seed)
    for step in range(args.steps):
        set_lrs(opt, peaks, config.lr_factor(step, args.steps))
        batch = windows(train, args.batch, args.seq, g)
        loss = model(batch[:, :-1], labels=batch[:, 1:]) / batch[:, 1:].numel()
        if not torch.isfinite(loss):
            return math.inf
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    vg, total, count = torch.Generator().manual_seed(7), 0.0, 0
    with torch.no_grad():
        for _ in range(args.val_batches):
            batch = windows(val, args.batch, args.seq, vg)
            total += model(batch[:, :-1], labels=batch[:, 1:]).item()
            count += batch[:, 1:].numel()
    loss = total / count
    return loss if math.isfinite(loss) else math.inf


def grid(args) -> list[tuple]:
    """Every (optim, parametrization, width, lr, seed) to run, the smallest widths first (µP at the base width is
    SP exactly: not run twice)."""
    out = []
    for width in args.widths:
        for optim in args.optims:
            for param in ("sp", "mup"):
                if param == "mup" and width == min(args.widths):
                    continue
                for lr in LR_GRID[optim]:
                    out += [(optim, param, width, lr, seed) for seed in args.seeds]
    return out


def summarize(runs: list[dict], widths: list[int]) -> dict:
    """Per optimizer and parametrization: the mean loss per width and lr, the best lr per width, and the shift of
    the best lr from the smallest to the largest width in grid steps (powers of 2)."""
    out = {}
    for optim in sorted({r["optim"] for r in runs}):
        for param in ("sp", "mup"):
            table = {}
            for width in widths:
                src = "sp" if width == min(widths) else param  # the base width is shared
                rows = [r for r in runs if (r["optim"], r["param"], r["width"]) == (optim, src, width)]
                by_lr: dict[float, list] = {}
                for r in rows:
                    by_lr.setdefault(r["lr"], []).append(r["val_loss"])
                if by_lr:
                    table[width] = {lr: sum(v) / len(v) for lr, v in sorted(by_lr.items())}
            best = {w: min(t, key=t.get) for w, t in table.items() if any(math.isfinite(x) for x in t.values())}
            done = [w for w in widths if w in best]
            shift = round(math.log2(best[done[-1]] / best[done[0]])) if len(done) > 1 else None
            out[f"{optim}/{param}"] = {"loss": table, "best_lr": best, "shift_steps": shift}
    return out


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib  # plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    optims = sorted({k.split("/")[0] for k in keys})
    fig, axes = plt.subplots(len(optims), 2, figsize=(9, 3.6 * len(optims)), squeeze=False)
    for row, optim in enumerate(optims):
        for col, param in enumerate(("sp", "mup")):
            ax, entry = axes[row][col], summary[f"{optim}/{param}"]
            for width, table in entry["loss"].items():
                lrs = [lr for lr, v in table.items() if math.isfinite(v)]
                (line,) = ax.plot(lrs, [table[lr] for lr in lrs], marker=".", label=f"width {width}")
                if width in entry["best_lr"]:
                    best = entry["best_lr"][width]
                    ax.plot([best], [table[best]], marker="*", markersize=11, color=line.get_color())
            ax.set_xscale("log", base=2)
            ax.set_xlabel("learning rate")
            ax.set_ylabel("validation loss (nats/byte)")
            ax.set_title(f"{optim}, {'µP' if param == 'mup' else 'SP'}: best lr moves {entry['shift_steps']} steps")
            ax.legend(fontsize=7)
            finite = [v for t in entry["loss"].values() for v in t.values() if math.isfinite(v)]
            if finite:
                ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm.bench.lr_transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for runs.jsonl, lr_transfer.json and lr_transfer.png")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--optims", nargs="+", choices=sorted(LR_GRID), default=["adamw", "muon"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = p.parse_args(argv)
    args.widths = sorted(args.widths)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["optim"], r["param"], r["width"], r["lr"], r["seed"], r["steps"]) for r in runs}
    data = corpus()
    for optim, param, width, lr, seed in grid(args):
        if (optim, param, width, lr, seed, args.steps) in done:
            continue
        start = time.perf_counter()
        loss = train_one(width, param, optim, lr, seed, args, data)
        row = {
            "optim": optim,
            "param": param,
            "width": width,
            "lr": lr,
            "seed": seed,
            "steps": args.steps,
            "val_loss": loss if math.isfinite(loss) else None,
            "seconds": round(time.perf_counter() - start, 1),
        }
        runs.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    runs = [
        {**r, "val_loss": math.inf if r["val_loss"] is None else r["val_loss"]}
        for r in runs
        if r["steps"] == args.steps and r["width"] in args.widths
    ]
    summary = summarize(runs, args.widths)
    tokens = args.steps * args.batch * args.seq
    title = (
        f"lr transfer: {args.layers} layers, {args.steps} steps x {args.batch}x{args.seq} bytes "
        f"({tokens:,} tokens), seeds {args.seeds}"
    )
    plot(summary, out / "lr_transfer.png", title)
    serializable = {
        k: {
            **v,
            "loss": {str(w): {str(lr): x for lr, x in t.items()} for w, t in v["loss"].items()},
            "best_lr": {str(w): lr for w, lr in v["best_lr"].items()},
        }
        for k, v in summary.items()
    }
    (out / "lr_transfer.json").write_text(json.dumps({"title": title, **serializable}, indent=1) + "\n")
    for key, entry in summary.items():
        best = ", ".join(f"{w}: 2^{math.log2(lr):.0f}" for w, lr in entry["best_lr"].items())
        print(f"{key:<12} best lr per width {best}; moves {entry['shift_steps']} grid steps")
    return summary


if __name__ == "__main__":
    main()
