"""Where the process runs and how the plain model is prepared for it.

- The process group: rank / world size from the environment (torchrun and the elastic launcher set
  RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under SLURM `srun` or submitit they are derived from the
  SLURM_* variables when RANK is unset). Backend: NCCL for CUDA tensors (plus gloo for CPU objects), gloo on CPU.
- `parallelize`: the model on its device with the chosen strategy — `single`, `ddp` (DistributedDataParallel) or
  `fsdp` (FSDP2 `fully_shard` per transformer block, then the root) — with activation checkpointing and
  torch.compile. The training loop only sees the returned module.
- The small collective helpers the trainer calls: gradient-sync control during accumulation, gradient clipping on
  DTensors, metric averaging, a lockstep share of the validation batches, gathered full checkpoints.
- `launch`: N local workers through PyTorch's elastic launcher (`trainer.nproc_per_node`), each calling the same
  training function with a plain (already resolved) config dict. This module does not import Hydra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from loguru import logger

from llm.errors import ConfigError, LLMError, check_choice

STRATEGIES = ("auto", "single", "ddp", "fsdp")
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


def hydra_output_subdir(default: str = ".hydra") -> str | None:
    """For conf/hydra/default.yaml (resolver `llm_output_subdir`): only rank 0 writes Hydra's `.hydra/`."""
    return default if env_rank() == 0 else None


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


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


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


# ---------------------------------------------------------------------------------------------- the model
def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def resolve_strategy(strategy: str, world_size: int) -> str:
    check_choice("trainer.strategy", strategy, set(STRATEGIES))
    if strategy == "auto":
        return "ddp" if world_size > 1 else "single"
    if strategy == "single" and world_size > 1:
        raise ConfigError(f"trainer.strategy=single runs one process, but WORLD_SIZE={world_size}; use "
                          f"trainer.strategy=ddp or fsdp (or auto)")
    if strategy in ("ddp", "fsdp") and world_size == 1:
        logger.info(f"trainer.strategy={strategy} with one process: training as single")
        return "single"
    return strategy


def parallelize(model: torch.nn.Module, env: DistEnv, strategy: str = "auto", compile: bool = False,
                activation_checkpointing: bool = False, precision: str = "auto") -> torch.nn.Module:
    """Move the model to its device and apply the chosen wrappers. Returns the module to train.

    fsdp shards in place (the returned module is `model` itself, its parameters DTensors), with bf16 parameters
    and fp32 gradient reduction when precision is bf16 (auto: on CUDA), else fp32; torch.compile then applies per
    block. ddp and single compile the whole (wrapped) model."""
    strategy = resolve_strategy(strategy, env.world_size)
    model = model.to(env.device)
    if activation_checkpointing:
        for block in model.blocks:
            block.activation_checkpointing = True
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = precision == "bf16" or (precision == "auto" and env.device.type == "cuda")
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
        for block in model.blocks:
            if compile:
                block.compile()  # in place: the block stays the module fully_shard wraps
            fully_shard(block, mp_policy=mp)
        # the root holds the embedding and the tied LM head (one parameter); it is needed again right at the start
        # of backward (the fused loss at the end of forward forms its gradient there): keep it unsharded
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # buffers (RoPE tables) are computed identically on every rank: no broadcast, so evaluation on a share of
        # the batches needs no collective in forward
        import inspect

        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None, **no_buffer_sync)
    if compile:
        model = torch.compile(model)
    return model


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Whether the next forward/backward reduces gradients across ranks. During gradient accumulation the trainer
    turns it off for every micro-batch but the last: DDP then skips the all-reduce (what `DDP.no_sync()` sets:
    `require_backward_grad_sync`, read at forward), FSDP2 the reduce-scatter (`set_requires_gradient_sync`, read
    in backward; unsharded gradients accumulate locally meanwhile). A no-op for a single process."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if hasattr(inner, "require_backward_grad_sync") and hasattr(inner, "no_sync"):  # DDP
        inner.require_backward_grad_sync = enabled
    elif hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(enabled)


@contextlib.contextmanager
def sync_context(model: torch.nn.Module, is_last: bool):
    """The context-manager form: `with sync_context(model, is_last): forward; backward` (DDP's `no_sync()` or
    FSDP2's `set_requires_gradient_sync(False)` unless is_last)."""
    if is_last:
        yield
        return
    set_gradient_sync(model, False)
    try:
        yield
    finally:
        set_gradient_sync(model, True)


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for plain and DTensor (FSDP) gradients; returns the total norm as a plain
    tensor, the same on every rank."""
    from torch.distributed.tensor import DTensor

    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the sharded norms' reduction (a collective)
    if max_norm != float("inf"):  # no clipping asked: leave the gradients alone
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


# ---------------------------------------------------------------------------------------------- metrics
def all_reduce_mean(metrics: dict) -> dict:
    """The mean over ranks of each 0-d tensor in `metrics` (one collective; a no-op with one rank)."""
    if not metrics or not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)  # the same order on every rank
    flat = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).reshape(()) for k in keys])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    mean = dict(zip(keys, flat.unbind()))
    return {k: mean[k] for k in metrics}


def reduce_sums(sums: dict, count):
    """Sum `sums` (0-d tensors) and `count` over ranks (one collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sums, count
    keys = sorted(sums)
    device = sums[keys[0]].device if keys else torch.device("cpu")
    flat = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=device).reshape(()) for k in keys]
                       + [torch.tensor(float(count), device=device)])
    dist.all_reduce(flat)
    return dict(zip(keys, flat[:-1].unbind())), flat[-1]


def eval_shard(n: int, batch_size: int, env: DistEnv):
    """This rank's share of the validation micro-batches [0, n) in steps of batch_size: (start, weight) pairs.
    Every rank gets the same number of batches (lockstep: FSDP forwards are collectives); a rank short of one
    repeats its first batch with weight 0."""
    starts = list(range(0, n, batch_size))
    rounds = math.ceil(len(starts) / env.world_size) if starts else 0
    for i in range(rounds):
        j = i * env.world_size + env.rank
        if j < len(starts):
            yield starts[j], min(n, starts[j] + batch_size) - starts[j]
        else:
            yield starts[env.rank % len(starts)], 0


# ---------------------------------------------------------------------------------------------- checkpoints
def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every optimizer parameter, in the order of optimizer.state_dict()'s integer ids."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class StateDictModule:
    """A gathered state dict where safetensors' save_model expects a module (it only calls state_dict())."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """What llm.train.checkpoint.save_checkpoint writes, on every rank (FSDP gathers, so all ranks call this).

    single / ddp: the plain module and the optimizer themselves (rank 0's replica is complete).
    fsdp: full state dicts gathered to rank 0 on the CPU (empty on the other ranks), keyed like the plain model's
    (tied weights share one tensor, optimizer state under integer ids) — the same files as a one-process run, so a
    checkpoint resumes on any number of ranks."""
    if not is_fsdp(model):
        return model, optimizer
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, optimizer, options=options)
    if not msd:  # ranks > 0
        return None, None
    for names in _tied_groups(model):
        for name in names[1:]:
            msd[name] = msd[names[0]]
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    state = {index[fqn]: value for fqn, value in osd["state"].items() if fqn in index}
    groups = [{**g, "params": [index[fqn] for fqn in g["params"] if fqn in index]} for g in osd["param_groups"]]
    return StateDictModule(msd), {"state": state, "param_groups": groups}


def load_state(directory, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a (full) checkpoint into the model and optimizer on this rank; every rank reads the same files."""
    from llm.train import checkpoint as ckpt

    if not is_fsdp(model):
        ckpt.load_model_weights(directory, model)
        if optimizer is not None:
            ckpt.load_optimizer(directory, optimizer)
        return
    import json

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    directory = Path(directory)
    options = StateDictOptions(full_state_dict=True)
    msd = load_file(str(directory / "model.safetensors"))
    for names in _tied_groups(model):  # stored once
        present = [n for n in names if n in msd]
        if not present:
            continue
        for name in names:
            msd.setdefault(name, msd[present[0]])
    expected = set(model.state_dict())
    if set(msd) != expected:
        raise ConfigError(f"checkpoint {directory}: weights do not match the model (missing "
                          f"{sorted(expected - set(msd))[:5]}, unexpected {sorted(set(msd) - expected)[:5]})")
    set_model_state_dict(model, msd, options=options)
    if optimizer is None:
        return
    flat = ckpt.optimizer_from_flat(load_file(str(directory / "optimizer.safetensors")),
                                    json.loads((directory / "optimizer.json").read_text()))
    names = _param_names(model, optimizer)
    osd = {"state": {names[int(i)]: v for i, v in flat["state"].items()},
           "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in flat["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=options)


# ---------------------------------------------------------------------------------------------- launching
class LaunchError(LLMError):
    """A worker started by `launch` failed; the message is its error."""


def _load_function(module: str, name: str, filename: str):
    """The training function in a worker: from its module, or — for a script run as __main__ (run.py) — by
    loading that script (its `if __name__ == '__main__'` block does not run)."""
    if module != "__main__":
        return getattr(importlib.import_module(module), name)
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__file__", None) == filename and hasattr(main, name):
        return getattr(main, name)  # multiprocessing's spawn already imported the script as __mp_main__
    spec = importlib.util.spec_from_file_location("llm_entry_script", filename)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    return getattr(script, name)


def _worker(target: tuple[str, str, str], cfg: dict, run_dir: str, threads: int | None):
    """One elastic worker: logging for its rank, the training function, the group torn down at the end."""
    from llm.utils.logging import setup_logging

    if threads and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    setup_logging(run_dir, rank=int(os.environ.get("RANK", 0)))
    try:
        return _load_function(*target)(cfg, run_dir)
    finally:
        shutdown()


def launch(fn, nproc: int, cfg: dict, run_dir: str, reraise: tuple[type[BaseException], ...] = (),
           on_signal: type[BaseException] | None = None):
    """Run `fn(cfg, run_dir)` in `nproc` local worker processes forming one process group, through PyTorch's
    elastic launcher (what torchrun uses). `cfg` is the plain, resolved config (no Hydra in the workers).
    Returns rank 0's return value. A worker's failure raises LaunchError with its message, or — when its exception
    class is one of `reraise` (by name) — that exception class again, in this process. SIGTERM, SIGUSR1/SIGUSR2
    (warnings before a time limit), SIGINT, ... reaching this process are passed on to the workers (which may save
    and stop), then raise `on_signal` here (if given)."""
    import dataclasses

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if env_world_size() > 1:
        raise ConfigError(f"trainer.nproc_per_node={nproc} inside an already distributed launch "
                          f"(WORLD_SIZE={env_world_size()}); set trainer.nproc_per_node=1 under torchrun or SLURM")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"llm-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
                          monitor_interval=0.1)
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    if "signals_to_handle" in fields:  # workers get the signal, and time to write a checkpoint
        config.signals_to_handle = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
    if "shutdown_timeout" in fields:
        config.shutdown_timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 300))
    target = (fn.__module__, fn.__name__, fn.__code__.co_filename)
    threads = max(1, (os.cpu_count() or 1) // nproc) if not torch.cuda.is_available() else None
    logger.info(f"launching {nproc} worker processes (elastic launcher, one process group)")
    try:
        results = elastic_launch(config, _worker)(target, cfg, run_dir, threads)
    except SignalException as e:
        if on_signal is None:
            raise
        raise on_signal(f"signal {e.sigval}") from e
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
