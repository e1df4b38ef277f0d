"""Coordinate check: does each layer's activation size stay put as the model widens? (µP's test, Yang et al. 2022)

    python -m llm.bench.coord --out coord/                      # widths 64..512, SP vs µP, AdamW, 4 steps
    python -m llm.bench.coord --out coord/ --optim muon --widths 64 128 256 --steps 6

For each width and each parametrization, a model of fixed depth (`--layers`, head count fixed, so the head width
grows with the model's) trains `--steps` steps at one learning rate on a small synthetic language (a fixed random
successor per token, followed 80% of the time), and before each step the mean |x| of every layer's output is
recorded: the token embedding, each block's attention and MLP outputs and residual stream, and the logits (mean
over `--seeds` seeds). Per layer and step the slope of log2 mean|x| against log2 width is fitted: under µP (base
width = the smallest width) it is about 0 after the first step, under the standard parametrization activations
grow with width (the logits about linearly with Adam). Writes `coord.png` (one panel per parametrization and step,
mean |x| against width per layer, log-log) and `coord.json` (the slopes and the raw means) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from llm.model import GPT, GPTConfig
from llm.train.muon import MuonConfig
from llm.train.optim import OptimizerConfig

VOCAB = 64  # small: tokens recur across steps, so a step's update sees inputs the earlier steps trained on


def batches(steps: int, batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    """`steps` batches [batch, seq + 1] of a synthetic language: each token's successor is a fixed random token
    80% of the time, a uniform one otherwise (the same batches for every width)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randperm(VOCAB, generator=g)
    out = []
    for _ in range(steps):
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(seq):
            follow = torch.rand(batch, generator=g) < 0.8
            x[:, t + 1] = torch.where(follow, succ[x[:, t]], torch.randint(0, VOCAB, (batch,), generator=g))
        out.append(x)
    return out


def layer_sizes(model: GPT, x: torch.Tensor) -> dict[str, float]:
    """Mean |x| of each layer's output on a forward pass of `x` (no gradients)."""
    sizes, hooks = {}, []

    def record(name):
        def hook(_module, _inputs, output):
            sizes[name] = output.detach().abs().mean().item()

        return hook

    hooks.append(model.tok_emb.register_forward_hook(record("embedding")))
    for i, block in enumerate(model.blocks):
        hooks.append(block.attn.register_forward_hook(record(f"block{i}.attn")))
        hooks.append(block.mlp.register_forward_hook(record(f"block{i}.mlp")))
        hooks.append(block.register_forward_hook(record(f"block{i}")))
    try:
        with torch.no_grad():
            logits = model(x)[..., :VOCAB]
        sizes["logits"] = logits.abs().mean().item()
    finally:
        for h in hooks:
            h.remove()
    return sizes


def build(width: int, parametrization: str, base_width: int, layers: int, heads: int, seq: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=VOCAB,
        n_layer=layers,
        n_head=heads,
        n_kv_head=heads,
        d_model=width,
        ffn_hidden=3 * width,  # exactly proportional (the presets round 8/3 x width up to 64: not at small widths)
        max_seq_len=seq,
        qk_norm=True,
        parametrization=parametrization,
        base_width=base_width,
    )
    return GPT(cfg)


def optimizer(name: str, lr: float):
    if name == "muon":
        return MuonConfig(lr=lr, adam_lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0)
    return OptimizerConfig(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0)


def trace(width, parametrization, args, seed) -> list[dict[str, float]]:
    """Mean |x| per layer before each of `args.steps` steps, and after the last."""
    model = build(width, parametrization, min(args.widths), args.layers, args.heads, args.seq, seed)
    opt = optimizer(args.optim, args.lr).build(model, "cpu")
    data = batches(args.steps, args.batch, args.seq, seed)
    sizes, probe = [], data[0][:, :-1]  # measured on the first batch throughout: the same inputs at every step
    for batch in data:
        sizes.append(layer_sizes(model, probe))
        model(batch[:, :-1], labels=batch[:, 1:], reduction="sum").div(batch[:, 1:].numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sizes.append(layer_sizes(model, probe))
    return sizes


def slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log2 value against log2 width."""
    xs, ys = [math.log2(w) for w in widths], [math.log2(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def coord_check(args) -> dict:
    """{"means": {param: {width: [per step {layer: mean|x|}]}}, "slopes": {param: [per step {layer: slope}]}}."""
    means: dict = {}
    for param in ("sp", "mup"):
        means[param] = {}
        for width in args.widths:
            runs = [trace(width, param, args, seed) for seed in range(args.seeds)]
            means[param][width] = [
                {k: sum(r[t][k] for r in runs) / len(runs) for k in runs[0][t]} for t in range(len(runs[0]))
            ]
    slopes = {
        param: [
            {
                k: slope(args.widths, [means[param][w][t][k] for w in args.widths])
                for k in means[param][args.widths[0]][t]
            }
            for t in range(args.steps + 1)
        ]
        for param in means
    }
    return {
        "widths": args.widths,
        "optim": args.optim,
        "lr": args.lr,
        "steps": args.steps,
        "means": means,
        "slopes": slopes,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib  # plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({0, 1, result["steps"] // 2, result["steps"]})
    fig, axes = plt.subplots(2, len(steps), figsize=(3.2 * len(steps), 6.0), sharex=True, squeeze=False)
    widths = result["widths"]
    for row, param in enumerate(("sp", "mup")):
        for col, t in enumerate(steps):
            ax = axes[row][col]
            for layer in result["means"][param][widths[0]][t]:
                ax.plot(widths, [result["means"][param][w][t][layer] for w in widths], marker=".", label=layer)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'µP' if param == 'mup' else 'SP'}, t={t}", fontsize=9)
            if row == 1:
                ax.set_xlabel("width")
            if col == 0:
                ax.set_ylabel("mean |x|")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"coordinate check ({result['optim']}, lr {result['lr']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm.bench.coord", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for coord.png and coord.json")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence (batch x seq well under the widths)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--optim", choices=["adamw", "muon"], default="adamw")
    p.add_argument("--no-plot", action="store_true", help="write coord.json only")
    args = p.parse_args(argv)
    args.widths = sorted(args.widths)
    if len(args.widths) < 2 or any(w % args.heads for w in args.widths):
        p.error(f"--widths {args.widths}: at least two, each divisible by --heads {args.heads}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = coord_check(args)
    (out / "coord.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_plot:
        plot(result, out / "coord.png")
    last = args.steps
    layers = list(result["slopes"]["sp"][last])
    print(f"slope of log2 mean|x| vs log2 width after {last} steps ({args.optim}, lr {args.lr}, widths {args.widths})")
    print(f"{'layer':<14}{'SP':>8}{'µP':>8}")
    for layer in layers:
        print(f"{layer:<14}{result['slopes']['sp'][last][layer]:>8.2f}{result['slopes']['mup'][last][layer]:>8.2f}")
    print(f"wrote {out / 'coord.json'}" + ("" if args.no_plot else f" and {out / 'coord.png'}"))
    return result


if __name__ == "__main__":
    main()
