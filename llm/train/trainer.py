"""The one training loop, for every task. What differs between tasks lives in the objective and the data.

fit(): prepare data -> wrap the model -> (resume) -> evaluate once -> loop over optimizer steps (gradient
accumulation over micro-batches, clipping, skipping non-finite steps, the lr schedule) with logging, evaluation
and checkpoints at their cadence -> final evaluation, checkpoint, `results.json` and a generated sample.
Beside the loop: `Checkpointer` (save / restore), `MetricsWindow` and the loggers, `StopSignals`, and
`llm.eval.sample`. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from tqdm.auto import tqdm

from llm.contract import Objective, batch_tokens
from llm.data.sampler import ResumableSampler
from llm.errors import ConfigError, TrainingError
from llm.eval.sample import generate_sample
from llm.model import flops_per_token, unwrap_model
from llm.train.branch import branch_origin
from llm.train.checkpointer import Checkpointer
from llm.train.cluster import StopSignals, dist_env
from llm.train.loggers import MetricsWindow, log_line, open_loggers
from llm.train.optim import OptimizerConfig, group_lrs, set_lrs
from llm.train.parallel import clip_grad_norm_, eval_shard, parallelize, reduce_sums, set_gradient_sync
from llm.train.settings import TrainerSettings
from llm.train.state import TrainerState, capture_rng, restore_rng


@dataclass(frozen=True)
class RunInfo:
    """Which run this is: its dir, its task's name, the seed (data order, sample), what to resume, the resolved
    config (the loggers record it), and whether it replaces an earlier run's files."""

    run_dir: str
    task: str = "pretrain"
    seed: int = 0
    resume: str | None = None  # auto | a run or checkpoint dir
    config: dict = field(default_factory=dict)
    overrides: tuple = ()  # the command line's overrides (results.json, sweep summaries)
    git_commit: str | None = None  # the code's version, when it runs from a git checkout
    overwrite: bool = False  # replace what an earlier run wrote in run_dir (once this one is about to train)
    fingerprint: dict = field(default_factory=dict)  # what a resume must share with its checkpoint to be exact


def split_batch(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """The global batch over ranks and micro-batches: (sequences per forward, accumulation steps). A micro-batch
    of None is each rank's whole share."""
    per_rank = batch_size // world_size
    micro = micro_batch_size or max(1, per_rank)
    if batch_size % (micro * world_size) and micro_batch_size is None:
        raise ConfigError(f"trainer.batch_size={batch_size} must be a multiple of the number of ranks, {world_size}")
    if batch_size % (micro * world_size):
        raise ConfigError(f"trainer.batch_size={batch_size} must be a multiple of trainer.micro_batch_size="
                          f"{micro} x {world_size} rank(s)")
    return micro, per_rank // micro


def check_fits(settings: TrainerSettings, max_seq_len: int, optim: OptimizerConfig) -> None:
    """Before the data is prepared: the sequence fits the model, the optimizer works under the strategy."""
    optim.check_strategy(settings.hardware.strategy)  # optim=muon refuses fsdp
    seq_len = settings.loop.seq_len
    if seq_len > max_seq_len:
        raise ConfigError(f"trainer.seq_len={seq_len} is longer than the model's context "
                          f"model.max_seq_len={max_seq_len}")


def check_trained(steps: int, skipped: int) -> None:
    """A run whose every step was skipped as non-finite trained nothing: an error, never 'done'."""
    if steps and skipped >= steps:
        raise TrainingError(f"all {steps} steps had a non-finite loss or gradient norm and were skipped: nothing was "
                            f"trained (check optim.lr and the data); the checkpoints hold the starting weights")


def optimizer_step(optimizer, parameters, grad_clip: float | None) -> torch.Tensor:
    """Clip, step and zero the gradients; returns the gradient norm (non-finite: the update was skipped)."""
    grad_norm = clip_grad_norm_(parameters, grad_clip or float("inf"))
    # Non-finite guard without a host sync: a fused AdamW skips the whole update when found_inf is set. A
    # non-finite loss gives non-finite gradients, and the norm is over the reduced gradients: every rank agrees.
    bad = (~torch.isfinite(grad_norm)).float()
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = bad
        optimizer.step()
    elif not bad.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def time_shares(started: float, prepared: float, ended: float, device) -> dict[str, torch.Tensor]:
    """A step's time split into preparing its batch (sampling, for task=grpo) and training on it, as shares."""
    share = (prepared - started) / max(ended - started, 1e-9)
    return {"time/generate_share": torch.tensor(share, device=device),
            "time/train_share": torch.tensor(1 - share, device=device)}


class Trainer:
    def __init__(self, model, data, objective: Objective, optim: OptimizerConfig, settings: TrainerSettings,
                 run: RunInfo, tokenizer=None, loggers=(), early_stop: Callable[[int, dict], str | None] | None = None,
                 stop: StopSignals | None = None):
        """`loggers`: factories called on rank 0 as `make(run_dir=, config=, start_step=)` (metrics.jsonl is
        always written). `early_stop(step, metrics)`: after each evaluation, a reason to finish the run now (a
        sweep's pruner giving up on the trial), or None. `stop`: the signals the job caught before (its own)."""
        check_fits(settings, model.config.max_seq_len, optim)
        self.model, self.data, self.objective, self.optim = model, data, objective, optim
        self.settings, self.run, self.tokenizer = settings, run, tokenizer
        self.loop, self.cadence, self.hardware = settings.loop, settings.cadence, settings.hardware
        self.run_dir = Path(run.run_dir)
        self.max_steps = self.loop.max_steps if objective.trains else 0  # evaluation-only tasks take no step
        self.logger_factories, self.early_stop = list(loggers or []), early_stop
        self.state, self.stop, self.loggers = TrainerState(), stop or StopSignals(), []
        self._started, self._wall_before = time.perf_counter(), 0.0

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        self.env = dist_env(self.hardware.device)
        self.device = self.env.device
        self.micro_batch_size, self.accum_steps = split_batch(self.loop.batch_size, self.loop.micro_batch_size,
                                                              self.env.world_size)
        self.eval_micro = self.loop.micro_batch_size or self.loop.batch_size  # x eval_batches, on any ranks
        bf16 = self.hardware.bf16(self.device.type)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.data.prepare()
        self.sampler = ResumableSampler(len(self.data.train), self.loop.batch_size, seed=self.run.seed,
                                        rank=self.env.rank, world_size=self.env.world_size)
        self.raw_model = unwrap_model(self.model)
        self.n_params = self.raw_model.num_params()
        hw = self.hardware  # fsdp shards raw_model in place (its parameters become DTensors)
        self.model = parallelize(self.raw_model, self.env, hw.strategy, hw.compile, hw.activation_checkpointing,
                                 hw.precision)
        self.optimizer = self.optim.build(self.raw_model, self.device.type) if self.max_steps else None
        self.peak_lrs = [g["lr"] for g in self.optimizer.param_groups] if self.optimizer else []  # as configured
        with self.autocast():  # before a resume restores weights: the objective sees the starting model
            self.objective.setup(self.model, self.data)
        self.stop.check("after preparing the data and the objective")  # the two steps that may take long
        self.checkpointer = Checkpointer(self.run_dir, self.tokenizer, self.cadence.keep_last, self.env.is_main)
        saved = self.run.resume and self.checkpointer.restore(self.run.resume, self.raw_model, self.optimizer,
                                                              self.run.fingerprint)
        if saved:
            self.state = TrainerState.from_dict(saved)
            self.sampler.load_state_dict(self.state.sampler)
            restore_rng(self.state.rng)
        if self.env.is_main:  # resumed: loggers drop what was logged after the checkpoint; overwrite: the old run
            self.loggers = open_loggers(self.run_dir, self.logger_factories, self.run.config, self.state.step,
                                        replace=self.run.overwrite)  # goes only now, all above succeeded
        # total (carried over a resume) and consecutive skipped steps, on the device
        self._skipped = torch.tensor(float(self.state.skipped_steps), device=self.device)
        self._consecutive = torch.zeros((), device=self.device)
        self.window = MetricsWindow(self.device, self.state.log_window)
        self.flops_per_token = flops_per_token(self.raw_model.config, self.n_params, self.loop.seq_len)
        where = f"{self.run.task} on {self.device} ({self.env.world_size} rank(s)), model {self.n_params:,} parameters"
        if not self.max_steps:
            logger.info(f"trainer: {where}, evaluation only (no training step)")
            return
        logger.info(
            f"trainer: {where}, {self.max_steps} steps x {self.loop.batch_size} sequences x {self.loop.seq_len} "
            f"tokens ({self.accum_steps} micro-batch(es) of {self.micro_batch_size} per rank), "
            f"{'bf16 autocast' if bf16 else 'fp32'}{', compiled' if hw.compile else ''}")

    # ------------------------------------------------------------------ steps
    def _batch(self, indices: list[int], dataset) -> dict[str, torch.Tensor]:
        batch = dataset.collate([dataset[i] for i in indices])
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self) -> tuple[dict[str, torch.Tensor], int]:
        """One optimizer step over `accum_steps` micro-batches: (metrics, device tensors; tokens of all ranks)."""
        indices = self.sampler.next_indices()
        set_lrs(self.optimizer, self.peak_lrs, self.optim.lr_factor(self.state.step, self.max_steps))
        sums: dict[str, torch.Tensor] = {}
        micro, started = self.micro_batch_size, time.perf_counter()
        with self.autocast():  # the objective's own batch (task=grpo samples completions here; others: as is)
            batches = [self.objective.prepare(self.model, self._batch(indices[m * micro : (m + 1) * micro],
                                                                      self.data.train), self.state.step)
                       for m in range(self.accum_steps)]
        prepared, tokens = time.perf_counter(), sum(batch_tokens(b) for b in batches)
        inner = self.objective.inner_steps  # optimizer steps over the same batch (1 but for task=grpo's option)
        bad = torch.zeros((), device=self.device)
        for _ in range(inner):
            for m, batch in enumerate(batches):
                set_gradient_sync(self.model, m == self.accum_steps - 1)  # reduce on the last micro-batch only
                with self.autocast():
                    loss, metrics = self.objective.loss(self.model, batch)
                if self.state.step + 1 in self.loop.nan_steps:  # testing aid: trainer.nan_steps
                    loss = loss * float("nan")
                    metrics = {**metrics, "loss": loss.detach()}
                (loss / self.accum_steps).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.float() / (self.accum_steps * inner)
            grad_norm = optimizer_step(self.optimizer, self.raw_model.parameters(), self.loop.grad_clip)
            bad = torch.maximum(bad, (~torch.isfinite(grad_norm)).float())  # any skipped update marks the step
        self._skipped += bad
        self._consecutive = (self._consecutive + bad) * bad
        sums["grad_norm"] = grad_norm
        if self.objective.generates:  # where the step's time goes: sampling the batch vs training on it
            sums.update(time_shares(started, prepared, time.perf_counter(), self.device))
        self.state.step += 1
        self.state.tokens_seen += tokens * self.env.world_size
        return sums, tokens * self.env.world_size

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """val_* metrics (as the objective summarizes them: loss, bits per byte) over the first eval_batches
        micro-batches of the validation split, the data's report, and the objective's own `evaluate`."""
        self.model.eval()
        n = len(self.data.val)
        if self.cadence.eval_batches:
            n = min(n, self.cadence.eval_batches * self.eval_micro)
        sums, count = {}, 0
        # each rank its share of the micro-batches, all ranks the same number of forwards (weight 0: padding)
        for start, weight in eval_shard(n, self.micro_batch_size, self.env):
            indices = list(range(start, min(n, start + self.micro_batch_size)))
            with self.autocast():
                metrics = self.objective.val_metrics(self.model, self._batch(indices, self.data.val))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float() * weight
            count += weight
        sums, count = reduce_sums(sums, count)  # over ranks
        means = self.objective.summarize({k: (v / count).item() for k, v in sums.items()})
        out = {**{f"val_{k}": v for k, v in means.items()}, **self.data.report(self.sampler)}
        with self.autocast():
            out.update(self.objective.evaluate(self.model, self.data))
        self.model.train()
        return out

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        try:
            with self.stop.installed():  # from here, a stop signal or Ctrl-C stops the run at the next `check`/step
                return self._fit()
        finally:  # an exception must not leave a W&B run (or files) open for the next sweep job
            for lg in self.loggers:
                lg.close()
            self.loggers = []

    def _fit(self) -> dict:
        self._started = started = time.perf_counter()
        self._setup()
        st, cadence = self.state, self.cadence
        self._wall_before = st.wall_seconds  # carried over a resume
        if st.step == 0 or st.initial_val_loss is None:
            val = self.evaluate()
            st.initial_eval, st.last_eval = val, val
            st.initial_val_loss = st.last_val_loss = val.get("val_loss")
            record = {**val, "wall_seconds": self._wall()}
            log_line(st.step, self.max_steps, record)
            for lg in self.loggers:
                lg.log(record, st.step)
        if not self.max_steps:
            st.seconds = time.perf_counter() - started  # an evaluation-only run reports how long it took
            return self._finish()
        self.model.train()
        bar = tqdm(total=self.max_steps, initial=st.step, desc=self.run.task, unit="step", dynamic_ncols=True,
                   disable=not (cadence.progress and self.env.is_main and sys.stderr.isatty()))
        self.window.restart_clock()
        t_start, seconds_before = time.perf_counter(), st.seconds
        while st.step < self.max_steps:
            self.window.add(*self.train_step())
            bar.update(1)
            last = st.step == self.max_steps
            do_eval = last or (cadence.eval_every and st.step % cadence.eval_every == 0)
            if do_eval or st.step % cadence.log_every == 0:
                self._log_step(do_eval, bar)
            st.seconds = seconds_before + time.perf_counter() - t_start
            stop = self.stop.agreed(self.env.world_size, self.device)
            if last or stop or (cadence.save_every and st.step % cadence.save_every == 0):
                self.save()
            if stop == StopSignals.FINISH and not last:
                logger.info(f"step {st.step}: finishing early ({self.stop.finish_reason})")
                break
            if stop and not last:  # a signal (fit() closes the loggers); on the last step the run simply finishes
                bar.close()
                raise self.stop.stopped(f"saved step {st.step}")
        bar.close()
        return self._finish()

    def _wall(self) -> float:  # the run's wall time so far: its earlier attempts' (from the checkpoint) + this one's
        return self._wall_before + time.perf_counter() - self._started

    def _log_step(self, do_eval: bool, bar) -> None:
        """Average the metrics since the last log line (the one host sync), evaluate if due, write them out,
        and stop the run when too many consecutive steps were skipped."""
        st = self.state
        record = self.window.mean()
        record.update(group_lrs(self.optimizer))  # lr (optim.lr as scheduled), lr/<group> where it differs
        record["tokens_per_s"] = self.window.tokens_per_s()
        record["tokens"] = st.tokens_seen
        record["wall_seconds"] = self._wall()  # to plot against time
        if self.device.type == "cuda":
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.hardware.peak_flops
            record["memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        st.train_loss = record.get("loss")
        st.skipped_steps = int(self._skipped.item())
        record["skipped_steps"] = st.skipped_steps
        if do_eval:
            val = self.evaluate()
            record.update(val)
            st.last_eval = val
            st.last_val_loss = val.get("val_loss", st.last_val_loss)
            reason = self.early_stop(st.step, val) if self.early_stop else None
            if reason:
                self.stop.finish(reason)
        log_line(st.step, self.max_steps, record)
        for lg in self.loggers:
            lg.log(record, st.step)
        bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.window.clear()
        consecutive, limit = int(self._consecutive.item()), self.loop.max_consecutive_skips
        if consecutive >= limit:
            raise TrainingError(
                f"stopping at step {st.step}: {consecutive} consecutive steps had a non-finite loss or "
                f"gradient norm (trainer.max_consecutive_skips={limit}); "
                f"{st.skipped_steps} skipped in all; the checkpoints hold finite weights")

    # ------------------------------------------------------------------ checkpoint and results
    def save(self) -> Path | None:
        """A checkpoint of this step with everything the loop needs to go on exactly (every rank calls it)."""
        st = self.state
        st.sampler, st.rng, st.log_window = self.sampler.state_dict(), capture_rng(), self.window.state_dict()
        st.skipped_steps, st.wall_seconds = int(self._skipped.item()), self._wall()
        st.fingerprint = dict(self.run.fingerprint)
        return self.checkpointer.save(st.step, self.raw_model, self.optimizer, st.to_dict())

    def _finish(self) -> dict:
        st = self.state
        check_trained(st.step, int(self._skipped.item()))
        st.wall_seconds = self._wall()
        results = st.results(task=self.run.task, params=self.n_params, device=str(self.device),
                             overrides=list(self.run.overrides), git_commit=self.run.git_commit,
                             checkpoint=self.checkpointer.last and str(self.checkpointer.last))
        results.update(branch_origin(self.run.config.get("init_from")))  # an anneal branch's checkpoint
        if self.stop.finish_reason:
            results["stopped_early"] = self.stop.finish_reason
        sample = generate_sample(self.raw_model, self.tokenizer, self.settings.sample, self.run.seed, self.autocast)
        if sample is not None:
            results["sample"] = sample
        if self.env.is_main:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
            self.objective.finish(results, self.run_dir)  # task-specific artefacts (tables, plots)
            if sample is not None:
                (self.run_dir / "sample.txt").write_text(sample)
                logger.info("sample:\n" + sample)
        done = f"{st.step} steps in {st.seconds:.1f}s" if self.max_steps else f"evaluation in {st.seconds:.1f}s"
        logger.info(f"done: {done}, val_loss {st.initial_val_loss} -> {st.last_val_loss}; "
                    f"results in {self.run_dir / 'results.json'}")
        return results
