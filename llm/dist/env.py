"""Where each process of a run is and how they form a group.

Rank / world size come from the environment (torchrun and the elastic launcher set
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under SLURM `srun` or submitit they are derived from the
SLURM_* variables when RANK is unset), with this rank's device. The process group: NCCL for CUDA tensors (plus
gloo for CPU objects), gloo on CPU; joined once per run. This room does not import Hydra.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from llm.errors import ConfigError, check_choice

STAMP_FORMAT = "%Y-%m-%d/%H-%M-%S"  # the same as conf/hydra/default.yaml's ${now:...} run dir


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
    nodelist = (
        environ.get("SLURM_STEP_NODELIST")
        or environ.get("SLURM_JOB_NODELIST")
        or environ.get("SLURM_NODELIST")
        or "localhost"
    )
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
    return {
        "RANK": environ["SUBMITIT_LOCAL_GLOBALID"],
        "WORLD_SIZE": environ["SUBMITIT_LOCAL_NTASKS"],
        "LOCAL_RANK": environ.get("SUBMITIT_LOCAL_LOCALID", "0"),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(re.sub(r"\D", "", job) or 0) % 20000),
    }


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


_REPORTED: list[socket.socket] = []  # the names this process holds (for as long as it lives)


def first_to_report(line: str, environ: dict | None = None) -> bool:
    """Whether this process prints `line`, the one line that ends its run. Under torchrun / srun every rank
    usually fails alike (a bad key, a missing file): of the ranks on this machine, only the first to end with that
    line prints it (the first, as the launcher stops the others once one has failed); a rank ending with another
    line prints its own. Outside a distributed launch: always.

    The first rank binds a Unix socket in the abstract namespace named by the launch and the line, and holds it
    until it exits: a name, not a file, so a failed launch leaves nothing in the temp dir (the kernel drops it
    with the process, `kill -9` included). A rank ending more than its exit later prints the line again."""
    environ = os.environ if environ is None else environ
    if env_world_size(environ) <= 1:
        return True
    launch = f"{os.getppid()}|{environ.get('LLM_RUN_STAMP', '')}|{environ.get('TORCHELASTIC_RUN_ID', '')}"
    name = f"\0llm-error-{hashlib.sha256(f'{launch}|{line}'.encode()).hexdigest()[:24]}"
    sock = None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(name)
    except OSError as e:
        if sock is not None:
            sock.close()
        return e.errno != errno.EADDRINUSE  # taken: another rank printed it; no such namespace: print it
    _REPORTED.append(sock)
    return True


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
