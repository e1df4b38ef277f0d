"""The one training loop, for every task. What differs between tasks lives in the objective and the data.

fit(): prepare data -> wrap the model -> (resume) -> evaluate once -> loop over optimizer steps (gradient
accumulation over micro-batches, clipping, skipping non-finite steps, the lr schedule) with logging, evaluation
and checkpoints at their cadence -> final evaluation, checkpoint, `results.json` and a generated sample.
Beside the loop: `Checkpointer` (save / restore), `MetricsWindow` and the loggers, `StopSignals`, and
`llm.eval.sample`. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from tqdm.auto import tqdm

from llm.checkpoint.checkpointer import Checkpointer
from llm.contract import Objective, batch_tokens
from llm.data.sampler import ResumableSampler
from llm.dist.env import dist_env
from llm.dist.parallel import parallelize
from llm.dist.signals import StopSignals
from llm.eval.sample import generate_sample
from llm.model import flops_per_token, unwrap_model
from llm.peft import trainable_report
from llm.train.branch import branch_origin, continue_optimizer
from llm.train.downstream import DownstreamEvals
from llm.train.evaluation import evaluate
from llm.train.guard import StepGuard
from llm.train.loggers import MetricsWindow, log_line, open_loggers
from llm.train.optim import OptimizerConfig, set_lrs
from llm.train.results import log_done, log_plan, step_record, write_results
from llm.train.settings import TrainerSettings
from llm.train.state import TrainerState, capture_rng, restore_rng
from llm.train.steps import check_consecutive, check_fits, check_trained, split_batch, time_shares, train_on


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


class Trainer:
    def __init__(
        self,
        model,
        data,
        objective: Objective,
        optim: OptimizerConfig,
        settings: TrainerSettings,
        run: RunInfo,
        tokenizer=None,
        loggers=(),
        early_stop: Callable[[int, dict], str | None] | None = None,
        stop: StopSignals | None = None,
        downstream=None,
    ):
        """`loggers`: factories called on rank 0 as `make(run_dir=, config=, start_step=)` (metrics.jsonl is
        always written). `early_stop(step, metrics)`: after each evaluation, a reason to finish the run now (a
        sweep's pruner giving up on the trial), or None. `stop`: the signals the job caught before (its own).
        `downstream`: a `DownstreamEvals` (conf/evals/), asked at step 0, at its cadence and at the end."""
        check_fits(settings, model.config.max_seq_len, optim)
        self.model, self.data, self.objective, self.optim = model, data, objective, optim
        self.settings, self.run, self.tokenizer = settings, run, tokenizer
        self.loop, self.cadence, self.hardware = settings.loop, settings.cadence, settings.hardware
        self.run_dir = Path(run.run_dir)
        self.max_steps = self.loop.max_steps if objective.trains else 0  # evaluation-only tasks take no step
        self.logger_factories, self.early_stop = list(loggers or []), early_stop
        self.downstream = downstream or DownstreamEvals()  # none: no task, nothing due
        self.state, self.stop, self.loggers = TrainerState(), stop or StopSignals(), []
        self._started, self._wall_before = time.perf_counter(), 0.0

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        self.env = dist_env(self.hardware.device)
        self.device = self.env.device
        self.micro_batch_size, self.accum_steps = split_batch(
            self.loop.batch_size, self.loop.micro_batch_size, self.env.world_size
        )
        self.eval_micro = self.loop.micro_batch_size or self.loop.batch_size  # x eval_batches, on any ranks
        bf16 = self.hardware.bf16(self.device.type)
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        )
        self.data.prepare()
        self.sampler = ResumableSampler(
            len(self.data.train),
            self.loop.batch_size,
            seed=self.run.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )
        self.raw_model = unwrap_model(self.model)
        self.trainable = trainable_report(self.raw_model)  # params, trainable_params (a LoRA run: the adapters), share
        hw = self.hardware  # fsdp shards raw_model in place (its parameters become DTensors)
        self.model = parallelize(
            self.raw_model, self.env, hw.strategy, hw.compile, hw.activation_checkpointing, hw.precision
        )
        self.optimizer = self.optim.build(self.raw_model, self.device.type) if self.max_steps else None
        self.peak_lrs = [g["lr"] for g in self.optimizer.param_groups] if self.optimizer else []  # as configured
        with self.autocast():  # before a resume restores weights: the objective sees the starting model
            self.objective.setup(self.model, self.data)
        self.stop.check("after preparing the data and the objective")  # the two steps that may take long
        self.checkpointer = Checkpointer(self.run_dir, self.tokenizer, self.cadence.keep_last, self.env.is_main)
        saved = self.run.resume and self.checkpointer.restore(
            self.run.resume, self.raw_model, self.optimizer, self.run.fingerprint
        )
        if saved:
            self.state = TrainerState.from_dict(saved)
            self.sampler.load_state_dict(self.state.sampler)
            restore_rng(self.state.rng)
        elif self.optimizer is not None and self.optim.init_state == "checkpoint":  # an anneal branch's moments
            continue_optimizer(self.run.config.get("init_from"), self.raw_model, self.optimizer)
        if self.env.is_main:  # resumed: loggers drop what was logged after the checkpoint; overwrite: the old run
            self.loggers = open_loggers(
                self.run_dir, self.logger_factories, self.run.config, self.state.step, replace=self.run.overwrite
            )  # goes only now, all above succeeded
        self.guard = StepGuard(
            self.device, self.state.skipped_steps, self.loop.spike_skip, self.loop.spike_window, self.state.spike_window
        )  # skipped steps (non-finite, loss spikes), on the device
        self.window = MetricsWindow(self.device, self.state.log_window, self.objective.summarize_train)
        flops = flops_per_token(self.raw_model.config, self.trainable["params"], self.loop.seq_len)
        self.mfu_per_token = flops / self.hardware.peak_flops  # MFU per token/s (CUDA)
        loop, micro = self.loop, self.micro_batch_size
        step = self.objective.describe_step(loop.batch_size, loop.seq_len, micro, self.accum_steps)
        log_plan(self.run, self.env, self.trainable, self.max_steps, self.settings, step)

    # ------------------------------------------------------------------ steps
    def _batch(self, indices: list[int], dataset) -> dict[str, torch.Tensor]:
        batch = dataset.collate([dataset[i] for i in indices])
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self) -> tuple[dict[str, torch.Tensor], int]:
        """One optimizer step over `accum_steps` micro-batches: (metrics, device tensors; tokens of all ranks)."""
        indices = self.sampler.next_indices()
        set_lrs(self.optimizer, self.peak_lrs, self.optim.lr_factor(self.state.step, self.max_steps))
        micro, started = self.micro_batch_size, time.perf_counter()
        batches = []
        with self.autocast():  # the objective's own batch (task=grpo samples completions here; others: as is)
            for m in range(self.accum_steps):
                batch = self._batch(indices[m * micro : (m + 1) * micro], self.data.train)
                batches.append(self.objective.prepare(self.model, batch, self.state.step))
        prepared, tokens = time.perf_counter(), sum(batch_tokens(b) for b in batches)
        step = self.state.step + 1  # testing aids: trainer.nan_steps, trainer.spike_steps
        aid = float("nan") if step in self.loop.nan_steps else 100.0 if step in self.loop.spike_steps else None
        sums, grad_norm, bad = train_on(
            self.model,
            self.raw_model,
            self.objective,
            self.optimizer,
            batches,
            self.autocast,
            self.loop.grad_clip,
            self.guard,
            aid,
        )
        self.guard.record(bad)
        sums["grad_norm"] = grad_norm
        if self.objective.generates:  # where the step's time goes: sampling the batch vs training on it
            sums.update(time_shares(started, prepared, time.perf_counter(), self.device))
        self.state.step += 1
        self.state.tokens_seen += tokens * self.env.world_size
        return sums, tokens * self.env.world_size

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
            val = evaluations(self, True, self.downstream.enabled, final=True)  # downstream: all items, as at the end
            st.initial_eval, st.last_eval = val, val
            st.initial_val_loss = st.last_val_loss = val.get("val_loss")
            record = {**val, "wall_seconds": self._wall(), **self.downstream.seconds_record()}
            log_line(st.step, self.max_steps, record)
            for lg in self.loggers:
                lg.log(record, st.step)
        if not self.max_steps:
            st.seconds = time.perf_counter() - started  # an evaluation-only run reports how long it took
            return self._finish()
        self.model.train()
        bar = tqdm(
            total=self.max_steps,
            initial=st.step,
            desc=self.run.task,
            unit="step",
            dynamic_ncols=True,
            disable=not (cadence.progress and self.env.is_main and sys.stderr.isatty()),
        )
        self.window.restart_clock()
        t_start, seconds_before = time.perf_counter(), st.seconds
        while st.step < self.max_steps:
            self.window.add(*self.train_step())
            bar.update(1)
            last = st.step == self.max_steps
            do_eval = last or (cadence.eval_every and st.step % cadence.eval_every == 0)
            downstream = self.downstream.due(st.step, last)
            if do_eval or downstream or st.step % cadence.log_every == 0:
                self._log_step(do_eval, bar, downstream, last)
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

    def _log_step(self, do_eval: bool, bar, downstream: bool = False, last: bool = False) -> None:
        """Average the metrics since the last log line (the one host sync), evaluate if due (validation,
        downstream tasks), write them out, and stop the run when too many consecutive steps were skipped."""
        st = self.state
        record = step_record(self.window, self.optimizer, st.tokens_seen, self._wall(), self.device, self.mfu_per_token)
        st.train_loss = record.get("loss")
        st.skipped_steps = self.guard.skipped
        record["skipped_steps"] = st.skipped_steps
        if do_eval or downstream:
            val = evaluations(self, do_eval, downstream, final=last)
            record.update(val, **self.downstream.seconds_record())
            st.last_eval = {**st.last_eval, **val}  # a downstream-only step keeps the last validation's values
            st.last_val_loss = val.get("val_loss", st.last_val_loss)
            reason = self.early_stop(st.step, val) if self.early_stop else None
            if reason and st.step < self.max_steps:  # at the last step nothing is left to stop: the run is done
                self.stop.finish(reason)
        log_line(st.step, self.max_steps, record)
        for lg in self.loggers:
            lg.log(record, st.step)
        bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.window.clear()
        check_consecutive(st.step, self.guard.consecutive, self.loop.max_consecutive_skips, st.skipped_steps)

    # ------------------------------------------------------------------ checkpoint and results
    def save(self) -> Path | None:
        """A checkpoint of this step with everything the loop needs to go on exactly (every rank calls it)."""
        st = self.state
        st.sampler, st.rng, st.log_window = self.sampler.state_dict(), capture_rng(), self.window.state_dict()
        st.skipped_steps, st.spike_window, st.wall_seconds = self.guard.skipped, self.guard.state_dict(), self._wall()
        st.fingerprint = dict(self.run.fingerprint)
        return self.checkpointer.save(st.step, self.raw_model, self.optimizer, st.to_dict())

    def _finish(self) -> dict:
        st = self.state
        check_trained(st.step, self.guard.skipped)
        st.wall_seconds = self._wall()
        results = st.results(
            task=self.run.task,
            **self.trainable,
            device=str(self.device),
            overrides=list(self.run.overrides),
            git_commit=self.run.git_commit,
            checkpoint=self.checkpointer.last and str(self.checkpointer.last),
        )
        results.update(branch_origin(self.run.config.get("init_from")))  # an anneal branch's checkpoint
        if self.stop.finish_reason:
            results["stopped_early"] = self.stop.finish_reason
        results.update(self.downstream.summary(st.wall_seconds, st.seconds))  # eval_seconds, its share of the run
        sample = generate_sample(self.raw_model, self.tokenizer, self.settings.sample, self.run.seed, self.autocast)
        if sample is not None:
            results["sample"] = sample
        if self.env.is_main:
            write_results(self.run_dir, results, self.objective, sample)
        log_done(st, self.max_steps, self.run_dir, self.downstream.headline())
        return results


def evaluations(trainer: Trainer, validation: bool, downstream: bool, final: bool) -> dict:
    """The evaluations due at a step. `validation`: val_* metrics (as the objective summarizes them: loss, bits
    per byte) over the first eval_batches micro-batches of the validation split, the data's report, and the
    objective's own `evaluate`. `downstream`: the downstream tasks' metrics (conf/evals/), this rank's share of
    their items (all of them when `final`, at step 0 and the end; else the in-loop subset)."""
    tr, env = trainer, trainer.env
    out = {}
    if validation:
        batches, micro = tr.cadence.eval_batches, tr.micro_batch_size
        out = evaluate(
            tr.model, tr.data, tr.objective, tr.sampler, env, batches, tr.eval_micro, micro, tr.autocast, tr._batch
        )
    if downstream:
        out.update(tr.downstream.run(tr.raw_model, tr.tokenizer, env.rank, env.world_size, final, tr.autocast))
    return out
