"""Length extrapolation: perplexity and passkey retrieval at several multiples of the training context.

Perplexity at length L: windows of L held-out tokens; the loss is taken over the last `context` positions of each
window (the part that sees a long history), so a method that keeps working past the training length keeps the
same perplexity as in-length, and one that breaks shows it at once. The same positions give bits per byte
(`bpb_by_length`, llm/eval/bpb.py), comparable between models with different tokenizers.
Passkey at length L: a random 5-digit number assigned in Python-looking filler (the default corpus is Python
source) at several depths, then `assert passkey == ` and a greedy completion of 5 digits; accuracy = exact digits.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import torch

from llm.contract import IGNORE_INDEX, INPUT_IDS, LABELS, Objective
from llm.data.pretrain import PackedTokens
from llm.errors import ConfigError
from llm.eval import bpb
from llm.model import unwrap_model

FILLER = [
    "x = x + 1",
    "y = compute(x)",
    "if y > limit:",
    "    total += y",
    "items.append(total)",
    "result = process(items)",
    "value = result[0]",
    "count = len(items)",
]


class LengthEval(Objective):
    """Objective of `task=eval_length`: evaluates, does not train (the trainer runs no step). Its `loss` is the
    plain next-token loss, so `val_loss` is comparable with the training run's."""

    trains = False

    def __init__(
        self,
        context: int,
        multiples=(1, 2, 4, 8),
        windows: int = 16,
        passkey_trials: int = 10,
        passkey_depths=(0.1, 0.5, 0.9),
        seed: int = 0,
        batch_size: int = 4,
    ):
        if not isinstance(context, int) or context < 8:
            raise ConfigError(f"task.objective.context={context!r} must be the training context (an integer >= 8)")
        self.context, self.multiples, self.windows = context, [int(m) for m in multiples], windows
        self.passkey_trials, self.passkey_depths, self.seed = passkey_trials, list(passkey_depths), seed
        self.batch_size = batch_size
        self.token_bytes = None  # bytes per token id on the device (setup), for bits per byte

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        labels = batch[LABELS]
        loss = model(batch[INPUT_IDS], labels=labels) / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return loss, {"loss": loss.detach()}

    def val_metrics(self, model, batch: dict) -> dict:
        """The loss, and the summed nats and bytes of its targets (-> `val_bpb`, comparable across tokenizers)."""
        return bpb.nll_metrics(model(batch[INPUT_IDS], labels=batch[LABELS]), batch[LABELS], self.token_bytes)

    def summarize(self, metrics: dict) -> dict:
        return bpb.summarize(metrics)

    def setup(self, model, data) -> None:
        self.token_bytes = bpb.byte_table(data, next(unwrap_model(model).parameters()).device)

    @property
    def lengths(self) -> list[int]:
        return [self.context * m for m in self.multiples]

    @torch.no_grad()
    def perplexity(self, model, data, length: int) -> tuple[float, float]:
        """(perplexity, bits per byte) over windows of `length` + 1 consecutive held-out tokens (read straight
        from the packed validation array); bits per byte is NaN without a bytes table."""
        plain = unwrap_model(model)
        device = next(plain.parameters()).device
        if not isinstance(data.val, PackedTokens):  # a mixture's windows come from several token streams
            raise ConfigError(
                "task=eval_length reads one held-out token stream: use data=stdlib, files or hub, not a mixture"
            )
        tokens = data.val.tokens
        n = min(self.windows, (len(tokens) - 1) // length)
        if n < 1:
            raise ConfigError(f"the validation split has {len(tokens)} tokens, too few for one window of {length}")
        table = self.token_bytes if self.token_bytes is not None else bpb.byte_table(data, device)
        total, num_bytes, count = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for start in range(0, n, self.batch_size):
            rows = [
                torch.from_numpy(tokens[i * length : (i + 1) * length + 1].astype("int64"))
                for i in range(start, min(n, start + self.batch_size))
            ]
            window = torch.stack(rows).to(device)
            x, labels = window[:, :-1], window[:, 1:].clone()
            labels[:, : -self.context] = IGNORE_INDEX  # only the last `context` positions count
            total += plain(x, labels=labels)  # the model's fused head + loss: no [B, length, V] logits
            count += labels.size(0) * min(self.context, length)
            if table is not None:
                num_bytes += bpb.label_bytes(labels, table)
        return math.exp(total.item() / count), bpb.bits_per_byte(total.item(), num_bytes.item())

    @torch.no_grad()
    def passkey(self, model, tokenizer, length: int) -> float:
        plain = unwrap_model(model)
        device = next(plain.parameters()).device
        rng = random.Random(self.seed + length)
        filler_ids = [tokenizer(line + "\n", add_special_tokens=False)["input_ids"] for line in FILLER]
        hits = trials = 0
        for depth in self.passkey_depths:
            for _ in range(self.passkey_trials):
                key = str(rng.randint(10000, 99999))
                needle = tokenizer(f"passkey = {key}\n", add_special_tokens=False)["input_ids"]
                question = tokenizer("assert passkey == ", add_special_tokens=False)["input_ids"]
                budget = length - len(needle) - len(question)
                lines, used = [], 0
                while True:
                    nxt = filler_ids[rng.randrange(len(filler_ids))]
                    if used + len(nxt) > budget:
                        break
                    lines.append(nxt)
                    used += len(nxt)
                cut = int(depth * len(lines))
                ids = (
                    [t for line in lines[:cut] for t in line]
                    + needle
                    + [t for line in lines[cut:] for t in line]
                    + question
                )
                out = plain.generate(torch.tensor([ids], device=device), 8, temperature=0)[0, len(ids) :].tolist()
                hits += tokenizer.decode(out).strip().startswith(key)
                trials += 1
        return hits / trials

    def evaluate(self, model, data) -> dict:
        with warnings.catch_warnings():  # running past the context is the point here
            warnings.simplefilter("ignore")
            curves = {str(L): self.perplexity(model, data, L) for L in self.lengths}
            passkey = {str(L): self.passkey(model, data.tokenizer, L) for L in self.lengths}
        return {
            "method": method_label(unwrap_model(model).config.rope_scaling),
            "context": self.context,
            "ppl_by_length": {L: ppl for L, (ppl, _) in curves.items()},
            "bpb_by_length": {L: bits for L, (_, bits) in curves.items()},
            "passkey_by_length": passkey,
        }

    def finish(self, results: dict, run_dir: Path) -> None:
        """Write the table as markdown and the perplexity/passkey plot as PNG into the run dir."""
        if "ppl_by_length" in results:
            write_table_and_plot({results["method"]: results}, Path(run_dir), "length_eval")


def method_label(scaling: dict | None) -> str:
    """'none', 'linear x4', 'ntk x4', 'ntk-dynamic x4', 'yarn x4'."""
    if not scaling or scaling.get("type", "none") == "none":
        return "none"
    kind = scaling["type"] + ("-dynamic" if scaling.get("dynamic") else "")
    return f"{kind} x{scaling.get('factor', 1):g}"


def write_table_and_plot(by_method: dict[str, dict], out_dir: Path, stem: str) -> None:
    """by_method: label -> results with ppl_by_length / passkey_by_length (and bpb_by_length). Writes <stem>.md
    and <stem>.png."""
    import matplotlib  # plotting only: not imported by runs that draw nothing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lengths = sorted({int(L) for r in by_method.values() for L in r["ppl_by_length"]})
    columns = [("ppl", "ppl_by_length"), ("bpb", "bpb_by_length"), ("passkey", "passkey_by_length")]
    columns = [(name, key) for name, key in columns if any(key in r for r in by_method.values())]
    rows = [
        "| method | " + " | ".join(f"{name}@{L}" for name, _ in columns for L in lengths) + " |",
        "|---" * (1 + len(columns) * len(lengths)) + "|",
    ]
    for label, r in by_method.items():
        cells = [f"{r.get(key, {}).get(str(L), float('nan')):.2f}" for _, key in columns for L in lengths]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    (out_dir / f"{stem}.md").write_text("\n".join(rows) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(by_method, indent=2, default=str))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in by_method.items():
        axes[0].plot(lengths, [r["ppl_by_length"].get(str(L), float("nan")) for L in lengths], marker="o", label=label)
        axes[1].plot(
            lengths, [r["passkey_by_length"].get(str(L), float("nan")) for L in lengths], marker="o", label=label
        )
    axes[0].set(
        xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity", title="perplexity vs length"
    )
    axes[1].set(
        xscale="log",
        xlabel="context length (tokens)",
        ylabel="passkey accuracy",
        ylim=(-0.05, 1.05),
        title="passkey retrieval",
    )
    for ax in axes:
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured lengths on the log axis
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=110)
    plt.close(fig)
