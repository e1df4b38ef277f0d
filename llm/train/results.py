"""What a run says about itself: the plan it logs before the first step, and at the end `results.json`, the
objective's own artefacts, the generated sample and the closing line. Only rank 0 writes files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from loguru import logger

from llm.dist.env import DistEnv
from llm.train.optim import group_lrs
from llm.train.settings import TrainerSettings
from llm.train.state import TrainerState
from llm.utils.files import write_atomic


def log_plan(run, env: DistEnv, trainable: dict, max_steps: int, settings: TrainerSettings, step: str) -> None:
    """The trainer's line before the first step: the task (`run.task`), device and ranks, the model (`trainable`:
    its parameters, those trained and their share), what each step consumes (`step`: the objective's words)."""
    where = f"{run.task} on {env.device} ({env.world_size} rank(s)), model {params_line(trainable)}"
    if not max_steps:
        logger.info(f"trainer: {where}, evaluation only (no training step)")
        return
    hw = settings.hardware
    logger.info(
        f"trainer: {where}, {max_steps} steps of {step}, "
        f"{'bf16 autocast' if hw.bf16(env.device.type) else 'fp32'}{', compiled' if hw.compile else ''}"
    )


def params_line(report: dict) -> str:
    return (
        f"{report['params']:,} parameters ({report['trainable_params']:,} trainable, "
        f"{100 * report['trainable_share']:.2f}%)"
    )


def step_record(window, optimizer, tokens_seen: int, wall_seconds: float, device, mfu_per_token: float) -> dict:
    """A log line's metrics: the window's means (the one host sync), the learning rates, throughput, tokens seen
    and wall time; on CUDA the model FLOPs utilisation (`mfu_per_token`: per token/s) and peak memory."""
    record = window.mean()
    record.update(group_lrs(optimizer))  # lr (optim.lr as scheduled), lr/<group> where it differs
    record["tokens_per_s"] = window.tokens_per_s()
    record["tokens"] = tokens_seen
    record["wall_seconds"] = wall_seconds  # to plot against time
    if device.type == "cuda":
        record["mfu"] = record["tokens_per_s"] * mfu_per_token
        record["memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def write_results(run_dir: Path, results: dict, objective, sample: str | None) -> None:
    """results.json, the objective's task-specific artefacts (tables, plots) and sample.txt (rank 0)."""
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    objective.finish(results, run_dir)
    if sample is not None:
        (run_dir / "sample.txt").write_text(sample)
        logger.info("sample:\n" + sample)


def log_done(state: TrainerState, max_steps: int, run_dir: Path, headline=()) -> None:
    """The closing line: steps and time, the validation loss before -> after; a task without one (task=grpo) shows
    its own evaluation's numbers (exact match, reward) before -> after instead; `headline`: keys of the downstream
    evaluations (eval/core) shown before -> after too."""
    done = f"{state.step} steps in {state.seconds:.1f}s" if max_steps else f"evaluation in {state.seconds:.1f}s"
    change = f"val_loss {state.initial_val_loss} -> {state.last_val_loss}"
    if max_steps and state.initial_val_loss is None and state.last_val_loss is None:
        before, after = state.initial_eval, state.last_eval
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        own = [
            f"{k} {before[k]:.4g} -> {v:.4g}"
            for k, v in after.items()
            if number(v) and number(before.get(k)) and not k.startswith("eval/")
        ]
        change = ", ".join(own) or change
    before, after = state.initial_eval, state.last_eval
    shown = [f"{k} {before[k]:.4g} -> {after[k]:.4g}" for k in headline if k in after and k in before and max_steps]
    shown += [f"{k} {after[k]:.4g}" for k in headline if k in after and not (k in before and max_steps)]
    change = ", ".join([change, *shown])
    logger.info(f"done: {done}, {change}; results in {run_dir / 'results.json'}")
