"""Metrics on their way out: `MetricsWindow` gathers each step's metrics on the device until a log line, and the
loggers share one small interface, `log(metrics, step)` and `close()`.

`JsonlLogger` (metrics.jsonl) is always on; TensorBoard and W&B are chosen with `logger=...` (several at once with
`logger=[tensorboard,wandb]`). Each is built by the trainer on rank 0 with the run dir and the resolved config.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

import torch
from loguru import logger

from llm.contract import MAX_METRIC, SUM_METRIC, combine_metric
from llm.dist.parallel import all_reduce_mean, get_world_size
from llm.errors import DataError
from llm.rundir import owner as rundir
from llm.utils.files import write_atomic


class MetricsWindow:
    """Sums of the per-step metrics (0-d device tensors: adding them costs no host sync) and the tokens and time
    since the last log line. `mean()` is the one host sync; `state_dict()` goes into checkpoints, so a resumed
    run's first log line averages over the same steps as the uninterrupted run's. A metric whose key ends in
    MAX_METRIC keeps its maximum, one ending in SUM_METRIC its sum (llm.contract); `summarize` (the objective's
    `summarize_train`) turns the reduced values into the logged ones."""

    def __init__(self, device: torch.device, state: dict | None = None, summarize=None):
        state = state or {}
        self.sums = {k: torch.tensor(v, device=device) for k, v in state.get("sums", {}).items()}
        self.steps = state.get("steps", 0)
        self.tokens, self.started = 0, time.perf_counter()
        self.summarize = summarize or (lambda metrics: metrics)

    def add(self, metrics: dict[str, torch.Tensor], tokens: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = combine_metric(k, self.sums.get(k), v)
        self.steps += 1
        self.tokens += tokens

    def mean(self) -> dict[str, float]:
        """The mean of each metric over the window's steps and over the ranks (a :max metric the maximum, a :sum
        metric the sum), as the objective summarizes them."""
        maxima = {k: v for k, v in self.sums.items() if k.endswith(MAX_METRIC)}
        sums = all_reduce_mean({k: v for k, v in self.sums.items() if k not in maxima}, "sum")  # one collective
        maxima = all_reduce_mean(maxima, "max")  # and one more where there are maxima
        world = get_world_size()
        values = {k: (v / (1 if k.endswith(SUM_METRIC) else self.steps * world)).item() for k, v in sums.items()}
        values.update({k: v.item() for k, v in maxima.items()})  # the host syncs
        summarized = self.summarize({k: values[k] for k in self.sums})
        return {k.removesuffix(MAX_METRIC).removesuffix(SUM_METRIC): v for k, v in summarized.items()}

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def clear(self) -> None:
        """Start the next window (after a log line, and its evaluation if any)."""
        self.sums, self.steps = {}, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.tokens, self.started = 0, time.perf_counter()

    def state_dict(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps}


def log_line(step: int, max_steps: int, record: dict) -> None:
    """The line of a logged step in the console and train.log (on every rank: each writes its own log file)."""
    if not math.isfinite(record.get("loss", 0.0)):
        logger.warning(f"step {step}: non-finite training loss {record.get('loss')}")
    parts = [f"step {step}/{max_steps}"] + [
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "tokens"
    ]
    logger.info(" | ".join(parts))


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as strings
    return value


def kept_records(path: Path, start_step: int) -> list[str]:
    """The lines of a metrics.jsonl up to `start_step` (a resume keeps them; started over, none): a blank or torn
    last line (a crash in the middle of a write) is dropped; any other line that is not a JSON object in UTF-8 is
    DataError naming the file and line, before anything is changed (a resume never drops records it cannot read)."""
    kept = []
    for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), 1):
        if not start_step or not raw.strip() or not raw.endswith(b"\n"):
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            why = f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        except ValueError as e:
            why = f"not valid JSON ({e})"
        else:
            if isinstance(record, dict) and isinstance(record.get("step", 0), int):
                if record.get("step", 0) <= start_step:
                    kept.append(raw.decode("utf-8"))
                continue
            why = "not a JSON object with an integer step"
        raise DataError(
            f"{path}:{number}: {why}; each line of metrics.jsonl is one step's record: fix or delete that line, then "
            f"resume again (nothing was changed), or start the run over with overwrite=true"
        )
    return kept


class JsonlLogger:
    """Appends one JSON object per logged step to `<run_dir>/metrics.jsonl`.

    The file is first touched by the first record: a resumed (or restarted) run then drops the records of steps
    after its checkpoint, so a run that fails before it logs anything leaves the earlier file as it was."""

    def __init__(self, run_dir: str, config: dict | None = None, start_step: int = 0, filename: str = "metrics.jsonl"):
        self.path = Path(run_dir) / filename
        self.start_step = start_step
        self.file = None
        self.kept = kept_records(self.path, start_step) if self.path.exists() else []  # checked before any work

    def open(self) -> None:
        """Trim and open the file (the first `log` does it; a run that ends without logging calls it itself)."""
        if self.file is not None:
            return
        if self.path.exists():  # resumed: keep the records up to its checkpoint; started over: none of them
            write_atomic(self.path, "".join(self.kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: dict, step: int) -> None:
        self.open()
        self.file.write(json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def open_loggers(run_dir: Path, factories, config: dict, start_step: int, replace: bool = False) -> list:
    """Rank 0's loggers: metrics.jsonl, then each factory's (`make(run_dir=, config=, start_step=)`). `replace`
    (overwrite=true): first remove what an earlier run wrote in run_dir (checkpoints, metrics, results, tb/)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if replace:
        rundir.clear(run_dir)
    return [JsonlLogger(str(run_dir), start_step=start_step)] + [
        make(run_dir=str(run_dir), config=config, start_step=start_step) for make in factories
    ]


class TensorBoardLogger:
    """TensorBoard event files under `<run_dir>/tb/` (view with `tensorboard --logdir outputs`)."""

    def __init__(self, run_dir: str, config: dict | None = None, start_step: int = 0, subdir: str = "tb"):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard hides events logged after the checkpoint by the interrupted run
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / subdir), purge_step=start_step or None)
        if config:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            value = _plain(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Weights & Biases. Offline by default (no account needed; `wandb sync <run_dir>/wandb/...` uploads later);
    set `logger.wandb.mode=online` and `logger.wandb.project=...` to stream. The run id is kept in the run dir so a
    resumed run continues the same W&B run."""

    def __init__(
        self,
        run_dir: str,
        config: dict | None = None,
        start_step: int = 0,
        project: str = "llm",
        name: str | None = None,
        entity: str | None = None,
        mode: str | None = "offline",
        tags: list | None = None,
        group: str | None = None,
    ):
        import wandb

        id_file = Path(run_dir) / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=project,
            name=name or Path(run_dir).name,
            entity=entity,
            mode=mode or os.environ.get("WANDB_MODE"),
            tags=list(tags) if tags else None,
            group=group,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow",
            reinit="finish_previous",
        )

        self.start_step = start_step

    def log(self, metrics: dict, step: int) -> None:
        if step < getattr(self.run, "step", 0):  # W&B steps only grow: a resumed run skips what it already recorded
            return
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()
