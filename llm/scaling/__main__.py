"""`python -m llm.scaling`: fit L(N, D) to finished runs and predict a larger one, or run the scaling ladder.

python -m llm.scaling fit <dir of run dirs> [--json FILE] [--plot FILE] [--predict 125m:2.5e9]
python -m llm.scaling fit ladder/ --hold-out-largest        # fit without the widest rung, then predict it
python -m llm.scaling ladder --out ladder/ [--widths 64 96 128 192] [--dry-run]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm.errors import LLMError
from llm.scaling.ladder import commands, plan, run_ladder
from llm.scaling.report import fit_command


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm.scaling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to the results.json under a directory")
    f.add_argument("runs", help="a directory of run dirs (searched recursively for results.json)")
    f.add_argument("--json", help="write the constants (E, A, alpha, B, beta) and the residuals here")
    f.add_argument("--plot", help="the fit and its residuals as a PNG (default: <runs>/scaling_fit.png)")
    f.add_argument(
        "--predict",
        action="append",
        default=[],
        metavar="NAME:TOKENS",
        help="a model preset (conf/model/NAME.yaml) or a parameter count, and a token count: its loss",
    )
    f.add_argument("--vocab-size", type=int, default=4096, help="the vocabulary of a --predict preset (4k BPE)")
    f.add_argument(
        "--hold-out-largest",
        action="store_true",
        help="fit without the runs of the largest model, then report how well it predicts them",
    )
    lad = sub.add_parser("ladder", help="run the scaling ladder (experiment=ladder) rung by rung")
    lad.add_argument("--out", required=True, help="the ladder's directory (one subdir per width)")
    lad.add_argument("--widths", type=int, nargs="+", default=[64, 96, 128, 192])
    lad.add_argument("--tokens-per-param", type=float, default=4.0)
    lad.add_argument("--batch0", type=int, default=8, help="the smallest rung's batch size (sequences)")
    lad.add_argument("--lr", type=float, default=6e-3, help="the peak lr of every rung (µP: one lr for all)")
    lad.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5], help="the smaller token budgets")
    lad.add_argument("--dry-run", action="store_true", help="print the plan and the commands only")
    lad.add_argument("overrides", nargs="*", help="more run.py overrides for every run (e.g. data.max_bytes=...)")
    return p.parse_args(argv)


def ladder_command(args) -> None:
    rungs = plan(args.widths, tokens_per_param=args.tokens_per_param, batch0=args.batch0, lr0=args.lr)
    for r in rungs:
        print(
            f"width {r.width}: {r.params:,} params, batch {r.batch_size}, {r.steps} steps "
            f"({r.steps * r.batch_size * 64:,} tokens), lr {r.lr:g}"
        )
    out = Path(args.out).absolute()
    cmds = commands(rungs, out, tuple(args.fractions), args.overrides)
    if args.dry_run:
        for cmd in cmds:
            print("python run.py " + " ".join(cmd))
        return
    run_ladder(cmds, Path(__file__).resolve().parents[2])


def main(argv=None) -> None:
    args = parse(argv)
    try:
        fit_command(args) if args.command == "fit" else ladder_command(args)
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
