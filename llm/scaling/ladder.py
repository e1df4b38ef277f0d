"""The scaling ladder: a set of model widths, each trained with batch size, lr and steps set by formula from its
size, WSD whose decays give several token budgets from one run (OLMo-core's ladder, on this project's pieces).

Per width W (depth, head count and context fixed by `experiment=ladder`, so only the width and the head width
grow, as µP assumes; µP with base width the smallest rung's):
    N      the model's parameters (built on the meta device: no weights), embedding included
    D      tokens_per_param x N tokens for the largest budget (Chinchilla's ~20 is far out of reach on 2 CPU cores)
    batch  batch0 x sqrt(N / N0) sequences, rounded to a power of 2 (N0: the smallest rung's N)
    lr     lr0 at every width: µP's per-group multipliers move the lr of each parameter with width
    steps  D / (batch x seq_len), rounded up to a multiple of 20 (checkpoints every steps / 5)
The main run is WSD: constant lr, then the last 20% of its steps decay to 0: the budget D. Each smaller budget
f x D (f in `fractions`) is an anneal branch (experiment=anneal's settings, and optim.init_state=checkpoint: AdamW's
moments and Muon's momentum go on) from the main run's checkpoint at 0.8 f x steps that decays over 0.2 f x steps,
so it has trained f x D tokens with the same shape of schedule. Every run writes results.json (params, tokens,
val_loss), which `python -m llm.scaling fit <ladder dir>` reads.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.model import GPT, GPTConfig

DECAY = 0.2  # the last fifth of every run (main or branch) decays


@dataclass
class Rung:
    width: int
    params: int
    batch_size: int
    steps: int
    lr: float

    @property
    def save_every(self) -> int:
        return self.steps // 5


def count_params(width: int, layers: int, heads: int, vocab_size: int, seq_len: int) -> int:
    """The parameters of the ladder's model at `width` (meta device: no memory, no init)."""
    with torch.device("meta"):
        cfg = GPTConfig(
            vocab_size=vocab_size, n_layer=layers, n_head=heads, n_kv_head=heads, d_model=width, max_seq_len=seq_len
        )
        return GPT(cfg).num_params()


def plan(
    widths: list[int], *, layers=4, heads=4, vocab_size=4096, seq_len=64, tokens_per_param=4.0, batch0=8, lr0=6e-3
) -> list[Rung]:
    """One rung per width (see the module doc for the formulas)."""
    widths = sorted(widths)
    n0 = count_params(widths[0], layers, heads, vocab_size, seq_len)
    rungs = []
    for w in widths:
        n = count_params(w, layers, heads, vocab_size, seq_len)
        batch = 2 ** round(math.log2(batch0 * math.sqrt(n / n0)))
        steps = 20 * math.ceil(tokens_per_param * n / (batch * seq_len) / 20)
        rungs.append(Rung(width=w, params=n, batch_size=batch, steps=steps, lr=lr0))
    return rungs


def commands(rungs: list[Rung], out: Path, fractions=(0.25, 0.5), extra: list[str] = ()) -> list[list[str]]:
    """The run.py argument lists of the ladder, in order: each rung's main run, then its anneal branches."""
    base_width = min(r.width for r in rungs)
    cmds = []
    for r in rungs:
        main = out / f"w{r.width}" / "main"
        cmds.append(
            [
                "experiment=ladder",
                f"model.d_model={r.width}",
                f"model.base_width={base_width}",
                f"trainer.batch_size={r.batch_size}",
                f"trainer.max_steps={r.steps}",
                f"trainer.save_every={r.save_every}",
                f"optim.lr={r.lr}",
                f"optim.adam_lr={r.lr}",
                f"optim.decay_fraction={DECAY}",
                f"hydra.run.dir={main}",
                *extra,
            ]
        )
        for f in fractions:
            budget = round(f * r.steps)
            start = round((1 - DECAY) * budget)
            if start % r.save_every:
                raise ValueError(f"fraction {f}: the branch point {start} is not a checkpoint step of {r.steps}")
            cmds.append(
                [
                    "experiment=ladder",
                    f"model.d_model={r.width}",
                    f"model.base_width={base_width}",
                    f"trainer.batch_size={r.batch_size}",
                    f"trainer.max_steps={budget - start}",
                    "trainer.save_every=0",
                    f"optim.lr={r.lr}",
                    f"optim.adam_lr={r.lr}",
                    "optim.init_state=checkpoint",
                    "optim.warmup_steps=0",
                    "optim.decay_fraction=1.0",  # what experiment=anneal sets: every step of the branch decays
                    f"init_from={main / 'checkpoints' / f'step_{start:07d}'}",
                    f"hydra.run.dir={out / f'w{r.width}' / f'budget_{f:g}'}",
                    *extra,
                ]
            )
    return cmds


def run_ladder(cmds: list[list[str]], root: Path) -> None:
    """Each command through run.py in turn, on one thread unless OMP_NUM_THREADS says otherwise (a run dir that
    already holds results.json is skipped: rerunning the ladder continues it)."""
    for cmd in cmds:
        run_dir = Path(next(a for a in cmd if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        if (run_dir / "results.json").exists():
            continue
        print("python run.py " + " ".join(cmd), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # tiny models: one thread
        subprocess.run([sys.executable, str(root / "run.py"), *cmd], check=True, cwd=root, env=env)
