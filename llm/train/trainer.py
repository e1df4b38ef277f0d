"""The one training loop, for every task. What differs between tasks lives in the objective and the data.

fit(): prepare data -> wrap the model -> (resume) -> evaluate once -> loop over optimizer steps (gradient
accumulation over micro-batches, clipping, schedule) with periodic logging, evaluation and checkpoints ->
final evaluation, checkpoint, `results.json` and a generated sample. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from loguru import logger
from tqdm.auto import tqdm

from llm.data.sampler import ResumableSampler
from llm.errors import ConfigError, LLMError, check_choice, check_positive

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by one of STOP_SIGNALS after saving a checkpoint; resume=auto goes on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """Raised after a checkpoint was saved because a stop signal (SIGTERM, SIGUSR1, SIGUSR2) arrived; run.py exits with PREEMPTED_EXIT_CODE."""


class TrainingError(LLMError):
    """Training cannot go on (too many non-finite steps, a checkpoint that cannot be written)."""
from llm.model import flops_per_token, unwrap_model
from llm.train import checkpoint as ckpt
from llm.train import distributed
from llm.train.distributed import dist_env, parallelize
from llm.train.loggers import JsonlLogger
from llm.train.optim import OptimizerConfig
from llm.train.state import TrainerState, capture_rng, restore_rng


class Trainer:
    def __init__(self, model, data, objective, optim: OptimizerConfig, run_dir: str, tokenizer=None,
                 loggers=(), run_config: dict | None = None, task: str = "pretrain", max_steps: int = 200,
                 batch_size: int = 16, micro_batch_size: int | None = None, seq_len: int = 128,
                 eval_every: int = 50, eval_batches: int | None = 20, save_every: int = 0,
                 keep_last: int | None = None, log_every: int = 10, grad_clip: float | None = 1.0,
                 device: str = "auto", precision: str = "auto", compile: bool = False,
                 activation_checkpointing: bool = False, strategy: str = "single", seed: int = 0,
                 resume: str | None = None, sample: dict | None = None, progress: bool = True,
                 peak_flops: float = 989e12, max_consecutive_skips: int = 10, nan_steps=()):
        for key in ("batch_size", "seq_len", "log_every"):
            check_positive(f"trainer.{key}", locals()[key])
        for key in ("max_steps", "eval_every", "save_every"):  # max_steps=0: evaluate only
            check_positive(f"trainer.{key}", locals()[key], allow_zero=True)
        self.micro_batch_auto = not micro_batch_size  # null: each rank's share of batch_size (set in _setup)
        micro_batch_size = micro_batch_size or batch_size
        check_positive("trainer.micro_batch_size", micro_batch_size)
        check_choice("trainer.precision", precision, {"auto", "fp32", "bf16"})
        if eval_batches is not None:
            check_positive("trainer.eval_batches", eval_batches)
        max_ctx = model.config.max_seq_len
        if seq_len > max_ctx:
            raise ConfigError(f"trainer.seq_len={seq_len} is longer than the model's context "
                              f"model.max_seq_len={max_ctx}")
        self.model, self.data, self.objective, self.optim = model, data, objective, optim
        self.run_dir, self.tokenizer, self.config, self.task = Path(run_dir), tokenizer, run_config or {}, task
        self.logger_factories = list(loggers or [])
        self.max_steps, self.batch_size, self.micro_batch_size, self.seq_len = max_steps, batch_size, micro_batch_size, seq_len
        self.eval_every, self.eval_batches, self.save_every, self.keep_last = eval_every, eval_batches, save_every, keep_last
        self.log_every, self.grad_clip, self.device_name, self.precision = log_every, grad_clip, device, precision
        self.compile, self.activation_checkpointing, self.strategy = compile, activation_checkpointing, strategy
        self.seed, self.resume, self.sample_cfg, self.progress, self.peak_flops = seed, resume, sample, progress, peak_flops
        check_positive("trainer.max_consecutive_skips", max_consecutive_skips)
        self.max_consecutive_skips, self.nan_steps = max_consecutive_skips, set(nan_steps or ())
        self.state = TrainerState()
        self._stop_signal = None
        self.loggers = []

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        if getattr(self.objective, "evaluate_only", False):  # e.g. task=eval_length: measure, do not train
            self.max_steps = 0
        self.env = dist_env(self.device_name)
        self.device = self.env.device
        per_rank = self.batch_size // self.env.world_size
        self.eval_micro = self.micro_batch_size  # eval_batches x this many validation sequences, on any number of ranks
        if self.micro_batch_auto:
            self.micro_batch_size = max(1, per_rank)
        if self.batch_size % (self.micro_batch_size * self.env.world_size):
            raise ConfigError(
                f"trainer.batch_size={self.batch_size} must be a multiple of trainer.micro_batch_size="
                f"{self.micro_batch_size} x {self.env.world_size} rank(s)"
            )
        self.accum_steps = per_rank // self.micro_batch_size
        bf16 = self.precision == "bf16" or (self.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.data.prepare()
        self.sampler = ResumableSampler(len(self.data.train), self.batch_size, seed=self.seed,
                                        rank=self.env.rank, world_size=self.env.world_size)
        self.raw_model = unwrap_model(self.model)
        self.n_params = self.raw_model.num_params()
        self.model = parallelize(self.raw_model, self.env, self.strategy, self.compile, self.activation_checkpointing,
                                 self.precision)  # fsdp shards raw_model in place (its parameters become DTensors)
        self.optimizer = self.optim.build(self.raw_model, self.device.type)
        if hasattr(self.objective, "setup"):  # before a resume restores weights: sees the starting model
            with self.autocast():
                self.objective.setup(self.model, self.data)
        if self.resume:
            self._restore(self.resume)
        self.loggers = []
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            start = self.state.step  # on resume, loggers drop what was logged after the checkpoint
            self.loggers = [JsonlLogger(str(self.run_dir), start_step=start)] + [
                make(run_dir=str(self.run_dir), config=self.config, start_step=start) for make in self.logger_factories
            ]
        # total (carried over a resume) and consecutive skipped steps, on the device
        self._skipped = torch.tensor(float(self.state.skipped_steps), device=self.device)
        self._consecutive = torch.zeros((), device=self.device)
        self._window = {k: torch.tensor(v, device=self.device) for k, v in self.state.log_window.get("sums", {}).items()}
        self._window_steps = self.state.log_window.get("steps", 0)
        self.flops_per_token = flops_per_token(self.raw_model.config, self.n_params, self.seq_len)
        logger.info(
            f"trainer: {self.task} on {self.device} ({self.env.world_size} rank(s)), model {self.n_params:,} "
            f"parameters, {self.max_steps} steps x {self.batch_size} sequences x {self.seq_len} tokens "
            f"({self.accum_steps} micro-batch(es) of {self.micro_batch_size} per rank), "
            f"{'bf16 autocast' if bf16 else 'fp32'}{', compiled' if self.compile else ''}"
        )

    def _restore(self, resume: str) -> None:
        path = ckpt.latest_checkpoint(self.run_dir) if resume == "auto" else ckpt.resolve_checkpoint(resume, "resume")
        if path is None:
            logger.info(f"resume=auto: no checkpoint in {self.run_dir}; starting from scratch")
            return
        ckpt.check_compatible(ckpt.read_json(path, "model_config.json"), self.raw_model.config.to_dict(),
                              "resume", path, strict=True)
        distributed.load_state(path, self.raw_model, self.optimizer)  # every rank: the same full checkpoint
        self.state = TrainerState.from_dict(ckpt.read_json(path, "trainer_state.json"))
        self.sampler.load_state_dict(self.state.sampler)
        restore_rng(self.state.rng)
        logger.info(f"resumed from {path} at step {self.state.step}")

    # ------------------------------------------------------------------ steps
    def _batch(self, indices: list[int], dataset) -> dict[str, torch.Tensor]:
        batch = dataset.collate([dataset[i] for i in indices])
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over `accum_steps` micro-batches. Returns metrics as device tensors (no sync)."""
        indices = self.sampler.next_indices()
        lr = self.optim.lr_at(self.state.step, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for m in range(self.accum_steps):
            batch = self._batch(indices[m * self.micro_batch_size : (m + 1) * self.micro_batch_size], self.data.train)
            tokens += sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))  # shapes only: no sync
            distributed.set_gradient_sync(self.model, m == self.accum_steps - 1)  # reduce on the last micro-batch
            with self.autocast():
                loss, metrics = self.objective.loss(self.model, batch)
            if self.state.step + 1 in self.nan_steps:  # testing aid: trainer.nan_steps
                loss = loss * float("nan")
                metrics = {**metrics, "loss": loss.detach()}
            (loss / self.accum_steps).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float() / self.accum_steps
        clip = self.grad_clip if self.grad_clip else float("inf")
        grad_norm = distributed.clip_grad_norm_(self.raw_model.parameters(), clip)  # plain or DTensor (fsdp) grads
        # Non-finite guard without a host sync: a fused AdamW skips the whole update when found_inf is set. A
        # non-finite loss gives non-finite gradients, and the norm is over the reduced gradients: every rank agrees.
        bad = (~torch.isfinite(grad_norm)).float()
        if getattr(self.optimizer, "defaults", {}).get("fused"):
            self.optimizer.found_inf = bad
            self.optimizer.step()
        elif not bad.item():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._skipped += bad
        self._consecutive = (self._consecutive + bad) * bad
        sums["grad_norm"] = grad_norm
        self.state.step += 1
        self.state.tokens_seen += tokens * self.env.world_size
        self._last_step_tokens = tokens * self.env.world_size
        return sums

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean objective metrics (val_*) over the first eval_batches micro-batches of the validation split, plus
        whatever the objective's own `evaluate(model, data)` measures (exact match, preference accuracy, ...)."""
        self.model.eval()
        n = len(self.data.val)
        if self.eval_batches:
            n = min(n, self.eval_batches * self.eval_micro)
        sums, count = {}, 0
        # each rank its share of the micro-batches, all ranks the same number of forwards (weight 0: padding)
        for start, weight in distributed.eval_shard(n, self.micro_batch_size, self.env):
            indices = list(range(start, min(n, start + self.micro_batch_size)))
            with self.autocast():
                _, metrics = self.objective.loss(self.model, self._batch(indices, self.data.val))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float() * weight
            count += weight
        sums, count = distributed.reduce_sums(sums, count)  # over ranks
        out = {f"val_{k}": (v / count).item() for k, v in sums.items()}
        if hasattr(self.objective, "evaluate"):
            with self.autocast():
                out.update(self.objective.evaluate(self.model, self.data))
        self.model.train()
        return out

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        try:
            return self._fit()
        finally:  # an exception must not leave a W&B run (or files) open for the next sweep job
            self._close_loggers()

    def _fit(self) -> dict:
        self._setup()
        st = self.state
        if st.step == 0 or st.initial_val_loss is None:
            val = self.evaluate()
            st.initial_eval, st.last_eval = val, val
            st.initial_val_loss = st.last_val_loss = val.get("val_loss")
            logger.info(f"step {st.step}: " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in val.items()))
            for lg in self.loggers[1:]:
                lg.log(val, st.step)
        self.model.train()
        bar = tqdm(total=self.max_steps, initial=st.step, desc=self.task, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.env.is_main and sys.stderr.isatty()))
        window_tokens, t_window, t_start = 0, time.perf_counter(), time.perf_counter()
        seconds_before = st.seconds
        with self._signal_handlers():
            while st.step < self.max_steps:
                metrics = self.train_step()
                for k, v in metrics.items():
                    self._window[k] = self._window.get(k, 0) + v
                self._window_steps += 1
                window_tokens += self._last_step_tokens
                bar.update(1)
                last = st.step == self.max_steps
                do_eval = last or (self.eval_every and st.step % self.eval_every == 0)
                if do_eval or last or st.step % self.log_every == 0:
                    self._log_step(do_eval, window_tokens, time.perf_counter() - t_window, bar)
                    window_tokens, t_window = 0, time.perf_counter()
                st.seconds = seconds_before + time.perf_counter() - t_start
                stop = self._agreed_stop()
                if last or stop or (self.save_every and st.step % self.save_every == 0):
                    self.save()
                if stop and not last:  # on the last step the run simply finishes
                    bar.close()
                    self._close_loggers()
                    logger.warning(f"signal {self._stop_signal}: saved step {st.step}; exiting with code "
                                   f"{PREEMPTED_EXIT_CODE} (resume=auto continues)")
                    raise Preempted(st.step)
        bar.close()
        return self._finish()

    def _log_step(self, do_eval: bool, window_tokens: int, elapsed: float, bar) -> None:
        """Average the metrics since the last log line (the one host sync), evaluate if due, write them out,
        and stop the run when too many consecutive steps were skipped."""
        st = self.state
        window, window_steps = distributed.all_reduce_mean(self._window), self._window_steps  # the ranks' mean
        record = {k: (v / window_steps).item() for k, v in window.items()}  # the one host sync
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
        record["tokens"] = st.tokens_seen
        if self.device.type == "cuda":
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak_flops
            record["memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        st.train_loss = record.get("loss")
        st.skipped_steps = int(self._skipped.item())
        record["skipped_steps"] = st.skipped_steps
        if do_eval:
            val = self.evaluate()
            record.update(val)
            st.last_eval = val
            st.last_val_loss = val.get("val_loss", st.last_val_loss)
        self._log(record, bar)
        self._window, self._window_steps = {}, 0
        consecutive = int(self._consecutive.item())
        if consecutive >= self.max_consecutive_skips:
            raise TrainingError(
                f"stopping at step {st.step}: {consecutive} consecutive steps had a non-finite loss or "
                f"gradient norm (trainer.max_consecutive_skips={self.max_consecutive_skips}); "
                f"{st.skipped_steps} skipped in all; the checkpoints hold finite weights")

    # ------------------------------------------------------------------ preemption
    @contextlib.contextmanager
    def _signal_handlers(self):
        """SIGTERM, SIGUSR1 (`sbatch --signal=USR1@120`) and SIGUSR2 (what submitit sends before the time limit)
        ask the loop to finish the step, save and exit."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        def handler(signum, frame):
            self._stop_signal = signal.Signals(signum).name
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _agreed_stop(self) -> bool:
        """Whether to stop after this step; under several ranks every rank gets the same answer."""
        flag = self._stop_signal is not None
        if self.env.world_size > 1 and torch.distributed.is_initialized():
            # a CPU tensor goes through gloo (the group is cpu:gloo,cuda:nccl): a small message between the ranks'
            # host threads each step, not a wait for the GPU to drain its queue
            on_cpu = "gloo" in str(torch.distributed.get_backend())
            t = torch.tensor(float(flag), device="cpu" if on_cpu else self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self._stop_signal is None:
                self._stop_signal = "peer rank"
        return flag

    def _close_loggers(self) -> None:
        for lg in self.loggers:
            lg.close()
        self.loggers = []

    def _log(self, record: dict, bar) -> None:
        st = self.state
        if not math.isfinite(record.get("loss", 0.0)):
            logger.warning(f"step {st.step}: non-finite training loss {record.get('loss')}")
        for lg in self.loggers:
            lg.log(record, st.step)
        parts = [f"step {st.step}/{self.max_steps}"] + [
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "tokens"
        ]
        logger.info(" | ".join(parts))
        bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", tok_s=f"{record['tokens_per_s']:.0f}")

    # ------------------------------------------------------------------ checkpoint and results
    def save(self) -> Path | None:
        model_state, optim_state = distributed.full_state(self.raw_model, self.optimizer)  # fsdp: all ranks gather
        if not self.env.is_main:
            distributed.barrier()  # until rank 0 has written it
            return None
        if not all(bool(torch.isfinite(t).all()) for t in model_state.state_dict().values()):
            raise TrainingError(f"step {self.state.step}: the weights are not finite; no checkpoint written")
        self.state.sampler = self.sampler.state_dict()
        self.state.rng = capture_rng()
        self.state.skipped_steps = int(self._skipped.item())
        self.state.log_window = {"sums": {k: float(v) for k, v in self._window.items()}, "steps": self._window_steps}
        path = self.run_dir / "checkpoints" / ckpt.step_dir_name(self.state.step)
        try:
            ckpt.save_checkpoint(path, model_state, optim_state, self.state.to_dict(),
                                 self.raw_model.config.to_dict(), self.tokenizer)
        except OSError as e:
            previous = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingError(f"checkpoint {path} could not be written ({e.strerror or e}); the newest complete "
                                f"checkpoint is {previous or 'none'}") from e
        ckpt.write_last_pointer(self.run_dir, path)
        ckpt.prune_checkpoints(self.run_dir, self.keep_last)
        logger.info(f"checkpoint: {path}")
        distributed.barrier()
        return path

    def generate_sample(self) -> str | None:
        cfg = self.sample_cfg
        if not cfg or self.tokenizer is None or not cfg.get("max_new_tokens"):
            return None
        prompt = cfg.get("prompt") or ""
        stop = self.tokenizer.eos_token_id
        if cfg.get("chat"):  # the prompt as a user turn, the reply generated until the end of the assistant turn
            from llm.data.chat import encode_chat, stop_token_id

            ids = encode_chat(self.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
            stop = stop_token_id(self.tokenizer)
        else:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [self.tokenizer.bos_token_id]
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        with self.autocast():
            out = self.raw_model.generate(
                torch.tensor([ids], device=self.device), cfg["max_new_tokens"], temperature=cfg.get("temperature", 0.8),
                top_k=cfg.get("top_k"), top_p=cfg.get("top_p"), eos_token_id=stop,
                generator=generator,
            )
        text = self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        return f"{prompt} -> {text}" if cfg.get("chat") else prompt + text

    def _finish(self) -> dict:
        st = self.state
        results = {
            "task": self.task,
            "steps": st.step,
            "tokens": st.tokens_seen,
            "seconds": round(st.seconds, 2),
            "tokens_per_s": st.tokens_seen / max(st.seconds, 1e-9),
            "train_loss": st.train_loss,
            "val_loss": st.last_val_loss,
            "initial_val_loss": st.initial_val_loss,
            "params": self.n_params,
            "skipped_steps": st.skipped_steps,
            "device": str(self.device),
        }
        for k, v in st.last_eval.items():  # final evaluation, and the same metrics before the first step
            if not k.startswith("val_"):
                results[k] = v
                if k in st.initial_eval and st.step > 0 and isinstance(v, (int, float)):
                    results[f"{k}_before"] = st.initial_eval[k]
        sample = self.generate_sample()
        if sample is not None:
            results["sample"] = sample
        if self.env.is_main:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
            if hasattr(self.objective, "finish"):  # task-specific artefacts (tables, plots)
                self.objective.finish(results, self.run_dir)
            if sample is not None:
                (self.run_dir / "sample.txt").write_text(sample)
                logger.info("sample:\n" + sample)
        self._close_loggers()
        logger.info(f"done: {st.step} steps in {st.seconds:.1f}s, val_loss {st.initial_val_loss} -> "
                    f"{st.last_val_loss}; results in {self.run_dir / 'results.json'}")
        return results
