"""The processes of a run: where each one is, how they form a group, how they are started and stopped.

- Environment: rank / world size from the environment (torchrun and the elastic launcher set
  RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under SLURM `srun` or submitit they are derived from the
  SLURM_* variables when RANK is unset), and this rank's device.
- The process group: NCCL for CUDA tensors (plus gloo for CPU objects), gloo on CPU; joined once per run.
- `launch`: N local workers through PyTorch's elastic launcher (`trainer.nproc_per_node`), each calling an
  importable function of the package with a plain (already resolved) config dict. This module does not import Hydra.
- `StopSignals`: SIGTERM / SIGUSR1 / SIGUSR2 (and Ctrl-C) ask the run to save and stop; every rank agrees on when.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from loguru import logger
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from llm.errors import ConfigError, LLMError, check_choice
from llm.failures import explain, quiet_loggers
from llm.utils.logging import setup_logging

STAMP_FORMAT = "%Y-%m-%d/%H-%M-%S"  # the same as conf/hydra/default.yaml's ${now:...} run dir
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


class LaunchError(LLMError):
    """A worker started by `launch` failed; the message is its error."""


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------- environment
def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03', 'a1,a2' -> 'a1'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_env(environ: dict) -> dict[str, str]:
    """The torch.distributed variables for one SLURM task (each task one rank, as with `srun python run.py` or
    the submitit launcher), from the SLURM_* ones. Empty when RANK is already set (torchrun), when not inside an
    `srun` step of several tasks, or when the job step has a single task."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_ID" not in environ:
        return {}
    world = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if world <= 1:
        return {}
    nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                or environ.get("SLURM_NODELIST") or "localhost")
    job = environ.get("SLURM_JOB_ID", "0")
    out = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
        # one port per job: array jobs sharing a node do not collide
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(re.sub(r"\D", "", job) or 0) % 20000),
    }
    nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    out["LOCAL_WORLD_SIZE"] = str(max(1, world // max(1, nodes)))
    return out


def submitit_local_env(environ: dict) -> dict[str, str]:
    """The same for submitit's local executor (`hydra/launcher=submitit_local` with tasks_per_node > 1)."""
    if "RANK" in environ or int(environ.get("SUBMITIT_LOCAL_NTASKS", 1)) <= 1:
        return {}
    job = environ.get("SUBMITIT_LOCAL_JOB_ID", "0")
    return {"RANK": environ["SUBMITIT_LOCAL_GLOBALID"], "WORLD_SIZE": environ["SUBMITIT_LOCAL_NTASKS"],
            "LOCAL_RANK": environ.get("SUBMITIT_LOCAL_LOCALID", "0"), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(re.sub(r"\D", "", job) or 0) % 20000)}


def cluster_env(environ: dict | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return slurm_env(environ) or submitit_local_env(environ)


def apply_cluster_env() -> None:
    """Export RANK/WORLD_SIZE/... derived from SLURM (or submitit) when no launcher set them."""
    os.environ.update(cluster_env())


def env_rank(environ: dict | None = None) -> int:
    """This process's rank as the environment says (0 outside a distributed launch)."""
    environ = os.environ if environ is None else environ
    return int(environ.get("RANK") or cluster_env(environ).get("RANK") or 0)


def env_world_size(environ: dict | None = None) -> int:
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE") or cluster_env(environ).get("WORLD_SIZE") or 1)


def resolve_device(device: str) -> torch.device:
    check_choice("trainer.device", device, {"auto", "cpu", "cuda"})
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
    return torch.device(device)


def cuda_index() -> int:
    """This rank's GPU: LOCAL_RANK among the visible ones (0 when a scheduler shows each task only its own GPU)."""
    return int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())


def init_distributed(device_type: str | None = None) -> bool:
    """Join the default process group when WORLD_SIZE > 1 (nothing when already joined or single). NCCL carries
    CUDA tensors (with gloo for CPU objects); gloo alone on CPU. Returns whether this call created the group."""
    apply_cluster_env()
    if dist.is_initialized() or env_world_size() <= 1:
        return False
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(cuda_index())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    minutes = int(os.environ.get("LLM_DIST_TIMEOUT_MIN", 30))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=minutes))
    return True


@contextlib.contextmanager
def process_group(device: str = "auto"):
    """The process group for one run: joined on entry when several ranks, destroyed on exit if joined here (a group
    that already existed — run.py's under torchrun — is left to its owner)."""
    created = init_distributed(resolve_device(device).type)
    try:
        yield
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def shutdown() -> None:
    """Destroy the process group, if any (the end of a worker or of run.py)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def prepare_launch() -> None:
    """run.py, before Hydra, in a process started by torchrun or `srun` (WORLD_SIZE > 1): join the process group
    and make every rank use rank 0's timestamp for the run dir (LLM_RUN_STAMP, read by conf/hydra/default.yaml),
    so that ranks starting in different seconds still share one run dir."""
    if env_world_size() <= 1:
        return
    init_distributed()
    if "LLM_RUN_STAMP" not in os.environ:
        os.environ["LLM_RUN_STAMP"] = agree_run_stamp()


def agree_run_stamp() -> str:
    """Rank 0's `STAMP_FORMAT` time, the same on every rank (a broadcast)."""
    stamp = [time.strftime(STAMP_FORMAT) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


def dist_env(device: str = "auto") -> DistEnv:
    """Rank, world size and device of this process (joining the process group when several ranks)."""
    dev = resolve_device(device)
    init_distributed(dev.type)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dev.type == "cuda":
        dev = torch.device("cuda", cuda_index())
        torch.cuda.set_device(dev)
    return DistEnv(rank, world, local_rank, dev)


@contextlib.contextmanager
def main_process_first(enabled: bool = True):
    """Rank 0 runs the block first (e.g. training a cached tokenizer), then the others (reading its cache)."""
    several = enabled and dist.is_initialized() and dist.get_world_size() > 1
    if several and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if several and dist.get_rank() == 0:
            dist.barrier()


# ---------------------------------------------------------------------------------------------- launching
def _worker(fn, cfg: dict, run_dir: str, threads: int | None):
    """One elastic worker: logging for its rank, the training function, the group torn down at the end."""
    if threads and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    setup_logging(run_dir, rank=int(os.environ.get("RANK", 0)))
    try:
        return fn(cfg, run_dir)
    except Exception as e:  # the parent reports it once, as one line (llm.failures); the traceback: this rank's log
        logger.opt(exception=e).debug("the error's traceback")
        if cfg.get("debug") or explain(e) in (None, e):
            raise
        raise explain(e) from None
    finally:
        shutdown()


def launch(fn, nproc: int, cfg: dict, run_dir: str, reraise: tuple[type[BaseException], ...] = (),
           on_signal: Callable[[str, str], BaseException] | None = None):
    """Run `fn(cfg, run_dir)` in `nproc` local worker processes forming one process group, through PyTorch's
    elastic launcher (what torchrun uses). `fn` is a module-level function of an importable module (the workers
    import it by name); `cfg` is the plain, resolved config (no Hydra in the workers).
    Returns rank 0's return value. A worker's failure raises LaunchError with its message, or — when its exception
    class is one of `reraise` (by name) — that exception class again, in this process. SIGTERM, SIGUSR1/SIGUSR2
    (warnings before a time limit), SIGINT, ... reaching this process are passed on to the workers (which may save
    and stop), then raise `on_signal(signal name, message)` here (if given)."""
    if env_world_size() > 1:
        raise ConfigError(f"trainer.nproc_per_node={nproc} inside an already distributed launch "
                          f"(WORLD_SIZE={env_world_size()}); set trainer.nproc_per_node=1 under torchrun or SLURM")
    if fn.__module__ == "__main__":
        raise ValueError(f"launch needs a function the workers can import, not {fn.__name__} of a script")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"llm-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
                          monitor_interval=0.1)
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    if "signals_to_handle" in fields:  # workers get the signal, and time to write a checkpoint
        config.signals_to_handle = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
    if "shutdown_timeout" in fields:
        config.shutdown_timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 300))
    threads = max(1, (os.cpu_count() or 1) // nproc) if not torch.cuda.is_available() else None
    logger.info(f"launching {nproc} worker processes (elastic launcher, one process group)")
    try:
        # the launcher's own lines (a failed worker's whole traceback) off: the caller reports it once, in one line
        with quiet_loggers(("torch.distributed.elastic", "torch.multi"), not (cfg.get("debug") or os.environ.get("LLM_DEBUG"))):
            results = elastic_launch(config, _worker)(fn, cfg, run_dir, threads)
    except SignalException as e:
        if on_signal is None:
            raise
        name = signal.Signals(e.sigval).name
        raise on_signal(name, f"signal {name}: the workers were stopped") from e
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", message)
        message = str(message or f"exit code {failure.exitcode}").strip().splitlines()[0]
        ours = re.match(r"(\w+): ?(.*)", message)
        for cls in reraise:
            if ours and ours.group(1) == cls.__name__:
                raise cls(ours.group(2)) from e
        if ours and ours.group(1) in {c.__name__ for c in _llm_error_classes()}:
            raise LaunchError(ours.group(2)) from e  # a one-line error of ours (config, data, ...)
        raise LaunchError(f"worker rank {rank} failed: {message}") from e
    return results[0]


def _llm_error_classes():
    stack, seen = [LLMError], []
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen


# ---------------------------------------------------------------------------------------------- stop signals
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
                os.write(2, b"\nCtrl-C: saving a checkpoint at the end of this step, then stopping "
                            b"(Ctrl-C again to abort without saving)\n")
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
        code = (self.INTERRUPT if self.received == "SIGINT" else self.PREEMPT if self.received
                else self.FINISH if self.finish_reason else self.GO_ON)
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
