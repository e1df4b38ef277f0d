"""Mixture of experts against dense: `python -m llm.bench moe` (or `python -m llm.bench.moe`).

Trains three models through run.py on the default corpus, each with every seed given, in turn:
  moe           model=tiny_moe: 8 experts of width 256, 2 per token, in every layer
  dense_active  model=tiny: one MLP of width 512, the width a token sees in the MoE (the same active parameters,
                the router's 8 x 192 per layer aside)
  dense_total   model=tiny model.ffn_hidden=2048: the MoE's total parameters in one dense MLP
  (and with --models, moe_aux_free: tiny_moe balanced by DeepSeek-V3's bias instead of the aux loss; and
  moe_experts_adamw, moe_router_muon, moe_experts_adamw_router_muon: tiny_moe with optim.experts / optim.router
  switched from the defaults, Muon's experts and AdamW's router)
and reports validation loss against tokens and against wall time, tokens/s, the final validation loss (mean
over the seeds) and an MoE's last logged load imbalance (moe/load_imbalance, max / mean tokens per expert).
First, in this process, the two dispatch paths of one tiny_moe layer (forward + backward on the batch's 2,048
tokens, alternated): torch._grouped_mm against a loop of one matmul per expert.

    python -m llm.bench moe                                  # 150 steps (the default run's), seeds 1 and 2
    python -m llm.bench moe --steps 60 --eval-every 20 --common "trainer.eval_batches=8" --out /tmp/moe_bench

Written to --out: `moe_bench.md` (the tables) and `moe_bench.json` (every evaluation of every run). Run by hand,
never in the suite; on a machine shared with other work, compare the runs' load (recorded before and after each).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from pathlib import Path

import torch

from llm.bench.recipe import run_recipe
from llm.model.moe import MoE, idle_params, parse_moe

MODELS = {
    "moe": ["model=tiny_moe"],
    "dense_active": ["model=tiny"],
    "dense_total": ["model=tiny", "model.ffn_hidden=2048"],
    "moe_aux_free": ["model=tiny_moe", "model.moe.balance=aux_free"],  # not by default: --models ... moe_aux_free
    # optim=muon's choices for the MoE (moe: the experts on Muon, the router on AdamW), not by default either
    "moe_experts_adamw": ["model=tiny_moe", "optim.experts=adamw"],
    "moe_router_muon": ["model=tiny_moe", "optim.router=muon"],
    "moe_experts_adamw_router_muon": ["model=tiny_moe", "optim.experts=adamw", "optim.router=muon"],
}


def dispatch_times(repeats: int = 10, tokens: int = 2048) -> dict[str, float]:
    """Median ms of forward + backward of one tiny_moe layer (D 192, 8 experts of 256, top 2) per dispatch path."""
    m = parse_moe({"num_experts": 8, "experts_per_token": 2, "expert_hidden": 256}, 1)
    torch.manual_seed(0)
    layers = {d: MoE(192, 512, {**m, "dispatch": d}) for d in ("grouped", "loop")}
    for layer in layers.values():
        layer.router.init_weights(0.02, 1.0)
        layer.experts.init_weights(0.02, 1.0)
    layers["loop"].load_state_dict(layers["grouped"].state_dict())
    x = torch.randn(tokens, 192)
    times = {d: [] for d in layers}
    for i in range(repeats + 2):
        for d, layer in layers.items():
            start = time.perf_counter()
            layer(x.requires_grad_()).square().mean().backward()
            if i >= 2:  # two warm-up rounds
                times[d].append(1e3 * (time.perf_counter() - start))
    return {d: statistics.median(t) for d, t in times.items()}


def params(run_dir: Path) -> tuple[int, int]:
    """(total, active per token) parameters of a finished run: its results' count, less the experts a token skips."""
    total = json.loads((run_dir / "results.json").read_text())["params"]
    last = run_dir / "checkpoints" / (run_dir / "checkpoints" / "last").read_text().strip()
    cfg = json.loads((last / "model_config.json").read_text())
    m = parse_moe(cfg.get("moe"), cfg["n_layer"])
    return total, total - idle_params(m, cfg["n_layer"], cfg["d_model"], cfg["ffn_hidden"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="trainer.max_steps of every run")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS)[:3], choices=list(MODELS))
    parser.add_argument(
        "--common", default="", help="more run.py overrides for every run (e.g. trainer.eval_batches=8)"
    )
    parser.add_argument("--out", default="moe_bench")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dispatch = dispatch_times()
    print(f"dispatch, one tiny_moe layer fwd+bwd on 2,048 tokens: {dispatch}", flush=True)
    runs = []
    for seed in args.seeds:
        for name in args.models:
            overrides = [*MODELS[name], f"trainer.max_steps={args.steps}", f"seed={seed}", *shlex.split(args.common)]
            run_dir = out / f"{name}_seed{seed}"
            run = run_recipe(name, overrides, run_dir, args.eval_every)
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            seen = {m["step"]: m["tokens"] for m in metrics if "tokens" in m}
            for e in run["evals"]:
                e["tokens"] = seen.get(e["step"], 0)
            imbalance = [m["moe/load_imbalance"] for m in metrics if "moe/load_imbalance" in m]
            run["load_imbalance"] = imbalance[-1] if imbalance else None  # the last step's; a dense model: none
            runs.append({**run, "seed": seed, "params": params(run_dir)})
            (out / "moe_bench.json").write_text(json.dumps({"dispatch_ms": dispatch, "runs": runs}, indent=2))
    result = {"dispatch_ms": dispatch, "runs": runs}
    md = report(result, args)
    (out / "moe_bench.md").write_text(md)
    (out / "moe_bench.json").write_text(json.dumps(result, indent=2))
    print(md)
    return result


def report(result: dict, args) -> str:
    d = result["dispatch_ms"]
    lines = [
        f"dispatch (one tiny_moe layer, fwd+bwd, 2,048 tokens, median ms): grouped {d['grouped']:.1f}, "
        f"loop {d['loop']:.1f}",
        "",
        "| model | params total / active | final val_loss (mean over seeds) | load imbalance (last step) | "
        "tokens/s | wall s | load before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        runs = [r for r in result["runs"] if r["name"] == name]
        total, active = runs[0]["params"]
        final = statistics.mean(r["evals"][-1]["val_loss"] for r in runs)
        per_seed = ", ".join(f"{r['evals'][-1]['val_loss']:.4f}" for r in runs)
        tps = statistics.mean(r["tokens_per_s"] or 0 for r in runs)
        wall = statistics.mean(r["evals"][-1]["wall_seconds"] for r in runs)
        loads = "; ".join(f"{r['load_before']} -> {r['load_after']}" for r in runs)
        imbalance = ", ".join("-" if r.get("load_imbalance") is None else f"{r['load_imbalance']:.2f}" for r in runs)
        lines.append(
            f"| {name} | {total:,} / {active:,} | {final:.4f} ({per_seed}) | {imbalance} | {tps:,.0f} | {wall:.0f} "
            f"| {loads} |"
        )
    lines += ["", "validation loss at each evaluation (tokens: val_loss at wall s), seed by seed:", ""]
    for r in result["runs"]:
        curve = ", ".join(f"{e['tokens']:,}: {e['val_loss']:.3f} @ {e['wall_seconds']:.0f}s" for e in r["evals"])
        lines.append(f"- {r['name']} seed {r['seed']}: {curve}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
