"""Scoring downstream items with a model, and their metrics (model and data only: the sharding over ranks is the
trainer's, `llm.train.downstream`).

Log-likelihood of a continuation after its context, as lm-evaluation-harness computes it: trailing spaces of the
context move to the continuation; the continuation's tokens are those of `tokenize(context + continuation)` after
the first `len(tokenize(context))` (no special tokens added); an empty context is the BOS token (EOS without one);
the input is the last `max_seq_len + 1` tokens, so a long context loses its start. The log-likelihoods are the
model's own per-token NLL (`model(ids, labels=..., reduction="none")`, its loss path: over its real vocabulary,
the rows it pads its embedding with never in the softmax, fused with the head). All choices of an item go in the
same batch; a batch is `batch_items` whole items, right-padded (the model is causal: padding after a sequence
changes none of its positions).

Per-item metrics (`item_metrics`), averaged over the items (`aggregate`):
- `acc`: 1 when the right choice has the highest summed log-likelihood (the first of ties, as numpy's argmax);
- `acc_norm`: the same with each log-likelihood divided by its continuation's length in characters (lm-eval's
  acc_norm, which counts the continuation as scored: a leading space included);
- `acc_tok`: divided by its number of tokens;
- `bpb`: bits per UTF-8 byte of the right continuation, -Σ ln p / (ln 2 x Σ bytes), summed over the items first;
- `exact_match` (`generate` tasks): the greedy reply, cut at the first stop string, equals the answer once both
  are stripped of surrounding whitespace.
`centered` = (acc - b) / (1 - b), b the task's random baseline (`BASELINES`), and `core` = the mean of the tasks'
centred primary accuracies, as DCLM's CORE score and nanochat's (there with their own baseline table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llm.contract import IGNORE_INDEX
from llm.errors import ConfigError
from llm.eval.items import Item

# Random-guess accuracy of each known task, by its name in conf/evals/: the chance of picking the right choice
# uniformly among its choices. Versioned: a score names the table it was centred with (`eval/core` uses this one).
BASELINES_NAME = "llm-core-v1"
BASELINES = {
    "hellaswag": 0.25,
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "piqa": 0.5,
    "winogrande": 0.5,
    "boolq": 0.5,
    "csqa": 0.2,
    "openbookqa": 0.25,
    "sciq": 0.25,
    "socialiqa": 1 / 3,
    "copa": 0.5,
}
METRICS = {
    "mc": ("acc", "acc_norm", "acc_tok", "bpb"),
    "schema": ("acc", "acc_norm", "acc_tok", "bpb"),
    "bpb": ("bpb",),
    "generate": ("exact_match",),
}
ACCURACIES = ("acc", "acc_norm", "acc_tok", "exact_match")


@dataclass
class Scored:
    """One item's scores: per choice the summed log-likelihood of its continuation and its number of tokens; a
    `generate` item's greedy reply."""

    lls: list[float]
    tokens: list[int]
    reply: str | None = None


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's `_encode_pair` splits them (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def score_items(model, tokenizer, items: list[Item], max_seq_len: int, batch_items: int = 8) -> list[Scored]:
    """Every choice of every item scored (see the module docstring), `batch_items` items per forward."""
    device = next(model.parameters()).device
    out: list[Scored] = []
    for start in range(0, len(items), max(1, batch_items)):
        chunk = items[start : start + batch_items]
        rows, spans = [], []
        for item in chunk:
            for ctx, cont in item.requests():
                c, k = encode_pair(tokenizer, ctx, cont)
                ids = (c + k)[-(max_seq_len + 1) :]
                n = min(len(k), len(ids) - 1)
                rows.append(ids)
                spans.append(n)
        width = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # the continuations' tokens only
        for i, (ids, n) in enumerate(zip(rows, spans)):
            x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
            labels[i, len(ids) - 1 - n : len(ids) - 1] = torch.tensor(ids[len(ids) - n :])
        # the model's per-token NLL (its loss path: fused with the head, no [B, T, V] logits; 0 where ignored)
        lls = (-model(x.to(device), labels=labels.to(device), reduction="none")).sum(-1).tolist()
        r = 0
        for item in chunk:
            out.append(Scored(lls[r : r + item.n_choices], spans[r : r + item.n_choices]))
            r += item.n_choices
    return out


@torch.no_grad()
def greedy_replies(
    model, tokenizer, items: list[Item], max_seq_len: int, max_new_tokens: int, until: list[str]
) -> list[Scored]:
    """A `generate` item's greedy reply to its context (cut at the first of `until`); prompts of the same length
    are generated together (no padding)."""
    device = next(model.parameters()).device
    prompts = [tokenizer(it.contexts[0], add_special_tokens=False)["input_ids"] for it in items]
    keep = max(1, max_seq_len - max_new_tokens)
    prompts = [p[-keep:] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    replies = [""] * len(items)
    for length, idx in by_length.items():
        x = torch.tensor([prompts[i] for i in idx], device=device)
        out = model.generate(x, max_new_tokens, temperature=0, eos_token_id=tokenizer.eos_token_id)[:, length:]
        for i, ids in zip(idx, out.tolist()):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            cut = min([text.find(s) for s in until if s and s in text], default=len(text))
            replies[i] = text[:cut]
    return [Scored([], [], reply=r) for r in replies]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of ties


def item_metrics(item: Item, scored: Scored, kind: str) -> dict[str, float]:
    """One item's metrics (sums for bpb: `bpb_nats`, `bpb_bytes`; `aggregate` makes the ratio)."""
    if kind == "generate":
        return {"exact_match": float(scored.reply.strip() == item.continuations[0].strip())}
    gold = item.gold
    _, cont = item.request(gold)
    out = {"bpb_nats": -scored.lls[gold], "bpb_bytes": float(len(cont.encode("utf-8")))}
    if kind in ("mc", "schema"):
        chars = [max(1, len(c)) for _, c in item.requests()]
        out["acc"] = float(_argmax(scored.lls) == gold)
        out["acc_norm"] = float(_argmax([ll / n for ll, n in zip(scored.lls, chars)]) == gold)
        out["acc_tok"] = float(_argmax([ll / max(1, n) for ll, n in zip(scored.lls, scored.tokens)]) == gold)
    return out


def aggregate(per_item: list[dict[str, float]], metrics: list[str]) -> dict[str, float]:
    """The task's metrics over its items: means of the accuracies, bpb from the summed nats and bytes."""
    out = {}
    for m in metrics:
        if m == "bpb":
            nats, num = sum(p["bpb_nats"] for p in per_item), sum(p["bpb_bytes"] for p in per_item)
            out[m] = nats / num / math.log(2) if num else float("nan")
        else:
            out[m] = sum(p[m] for p in per_item) / len(per_item) if per_item else float("nan")
    return out


def centered(acc: float, baseline: float) -> float:
    """Accuracy centred on the random baseline: 0 at chance, 1 when every item is right."""
    return (acc - baseline) / (1.0 - baseline)


def baseline_of(name: str, items: list[Item], given: float | None = None) -> float:
    """A task's random baseline: `given` (the task's `baseline` key), else the table's, else the chance of a
    uniform guess over each item's choices (averaged)."""
    if given is not None:
        return float(given)
    if name in BASELINES:
        return BASELINES[name]
    return sum(1.0 / it.n_choices for it in items) / len(items)


def check_metrics(name: str, kind: str, metrics, primary) -> tuple[list[str], str | None]:
    """A task's metrics and the accuracy its centred score uses, checked against its type."""
    allowed = METRICS[kind]
    if isinstance(metrics, str):
        metrics = [metrics]
    if not metrics or not isinstance(metrics, (list, tuple)):
        raise ConfigError(f"evals.tasks.{name}.metrics={metrics!r}: give a list, from {list(allowed)}")
    for m in metrics:
        if m not in allowed:
            raise ConfigError(
                f"evals.tasks.{name}.metrics: {m!r} is not a metric of a {kind} task; choose from {list(allowed)}"
            )
    if primary is not None and (primary not in metrics or primary not in ACCURACIES):
        raise ConfigError(
            f"evals.tasks.{name}.primary={primary!r} must be one of its accuracy metrics "
            f"{[m for m in metrics if m in ACCURACIES]}"
        )
    return list(metrics), primary
