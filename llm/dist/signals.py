"""How a run is stopped before max_steps: SIGTERM / SIGUSR1 / SIGUSR2 (and Ctrl-C) ask the run to save and stop;
every rank agrees on when (`StopSignals`); the exceptions that end the run then, with their exit codes."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from loguru import logger

from llm.dist.env import cuda_index

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by one of STOP_SIGNALS after saving a checkpoint; resume=auto goes on
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, the shell's code for Ctrl-C: a person stopped it (no scheduler requeues)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
ABORT_AFTER_S = 1.0  # a second Ctrl-C sooner than this is the same one, forwarded by a launcher to its workers


class Preempted(Exception):
    """Raised after a checkpoint was saved (or before the first step, with nothing to save) because a stop signal
    arrived; run.py exits with `exit_code`."""

    exit_code = PREEMPTED_EXIT_CODE


class Interrupted(Preempted):
    """The same for Ctrl-C (SIGINT)."""

    exit_code = INTERRUPTED_EXIT_CODE


def stop_exception(signal_name: str, message: str) -> Preempted:
    """The exception a stop by `signal_name` ends the run with."""
    return (Interrupted if signal_name == "SIGINT" else Preempted)(message)


class StopSignals:
    """Three ways a run ends before max_steps, agreed by every rank after each step (and, before the first step,
    at `check`):
    - a signal — SIGTERM, SIGUSR1 (`sbatch --signal=USR1@120`) or SIGUSR2 (what submitit sends before the time
      limit): finish the step, save, exit with code 75 (`Preempted`); `received` names the signal;
    - Ctrl-C (SIGINT): the same with exit code 130 (`Interrupted`); a second Ctrl-C aborts at once, saving nothing;
    - `finish(reason)`, e.g. a sweep's pruner giving up on the trial: save and finish the run as done, early."""

    GO_ON, FINISH, PREEMPT, INTERRUPT = 0, 1, 2, 3  # ranks agree on the largest

    def __init__(self):
        self.received: str | None = None
        self.finish_reason: str | None = None
        self._installed = False
        self._first_interrupt: float | None = None

    def finish(self, reason: str) -> None:
        self.finish_reason = reason

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is not None and now - self._first_interrupt > ABORT_AFTER_S:
                raise KeyboardInterrupt  # the second Ctrl-C: stop at once
            if self._first_interrupt is None:
                self._first_interrupt = now
                # not the logger: a handler may run in the middle of a log call (its lock)
                os.write(
                    2,
                    b"\nCtrl-C: saving a checkpoint at the end of this step, then stopping "
                    b"(Ctrl-C again to abort without saving)\n",
                )
        if self.received != "SIGINT":  # Ctrl-C wins: a person asked
            self.received = name

    @contextlib.contextmanager
    def installed(self):
        """Catch the stop signals and Ctrl-C for the duration of the block (only the main thread can; a block
        nested in another of the same object changes nothing)."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (*STOP_SIGNALS, signal.SIGINT)}
        self._installed = True
        try:
            yield
        finally:
            self._installed = False
            for s, h in previous.items():
                signal.signal(s, h)

    def agreed(self, world_size: int, device: torch.device) -> int:
        """GO_ON, FINISH, PREEMPT or INTERRUPT (a signal wins over an early finish, Ctrl-C over the others); every
        rank gets the same answer."""
        code = (
            self.INTERRUPT
            if self.received == "SIGINT"
            else self.PREEMPT
            if self.received
            else self.FINISH
            if self.finish_reason
            else self.GO_ON
        )
        if world_size > 1 and dist.is_initialized():
            # a CPU tensor goes through gloo (the group is cpu:gloo,cuda:nccl): a small message between the ranks'
            # host threads each step, not a wait for the GPU to drain its queue
            on_cpu = "gloo" in str(dist.get_backend())
            t = torch.tensor(float(code), device="cpu" if on_cpu else device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
            if code == self.INTERRUPT and self.received != "SIGINT":
                self.received = "SIGINT"  # on a peer rank
            elif code == self.PREEMPT and self.received is None:
                self.received = "peer rank"
            if code == self.FINISH and self.finish_reason is None:
                self.finish_reason = "rank 0's decision"
        return code

    def check(self, where: str) -> None:
        """Before the first step: when a stop signal arrived (on any rank: every rank calls this at the same
        points), stop now; `resume=auto` (or the same command) starts again."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        device = torch.device("cuda", cuda_index()) if world > 1 and torch.cuda.is_available() else torch.device("cpu")
        if self.agreed(world, device) >= self.PREEMPT:
            raise self.stopped(f"before the first step ({where}), nothing to save")

    def stopped(self, what: str) -> Preempted:
        """The exception that ends the run after a stop signal (`what`: what was saved), the reason logged."""
        who = "Ctrl-C" if self.received == "SIGINT" else f"signal {self.received}"
        error = stop_exception(self.received, f"{who}: {what}")
        logger.warning(f"{who}: {what}; exiting with code {error.exit_code} (resume=auto continues)")
        return error
