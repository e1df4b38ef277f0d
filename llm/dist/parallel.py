"""How the plain model is prepared for the processes of a run, and the few collectives the loop needs.

- `parallelize`: the model on its device with the chosen strategy — `single`, `ddp` (DistributedDataParallel) or
  `fsdp` (FSDP2 `fully_shard` per transformer block, then the root) — with activation checkpointing and
  torch.compile. The training loop only sees the returned module.
- Gradient-sync control during accumulation, gradient clipping on DTensors, metric averaging over ranks, the
  lockstep share of the validation batches, and rank 0's verdict on what it alone does (a checkpoint write).
"""

from __future__ import annotations

import inspect
import math
import sys

import torch
import torch.distributed as dist
from loguru import logger
from torch.nn.parallel import DistributedDataParallel as DDP

from llm.errors import ConfigError, check_choice
from llm.dist.env import DistEnv

STRATEGIES = ("auto", "single", "ddp", "fsdp")


# FSDP2 and DTensor are imported only by a run that shards: together they cost ~0.7 s of every start otherwise
# (a one-line config error included). Until `parallelize` imports them, no module or tensor can be one of theirs.
def is_fsdp(model: torch.nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _is_dtensor(x) -> bool:
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and isinstance(x, tensor.DTensor)


def resolve_strategy(strategy: str, world_size: int) -> str:
    check_choice("trainer.strategy", strategy, set(STRATEGIES))
    if strategy == "auto":
        return "ddp" if world_size > 1 else "single"
    if strategy == "single" and world_size > 1:
        raise ConfigError(
            f"trainer.strategy=single runs one process, but WORLD_SIZE={world_size}; use "
            f"trainer.strategy=ddp or fsdp (or auto)"
        )
    if strategy in ("ddp", "fsdp") and world_size == 1:
        logger.info(f"trainer.strategy={strategy} with one process: training as single")
        return "single"
    return strategy


def parallelize(
    model: torch.nn.Module,
    env: DistEnv,
    strategy: str = "auto",
    compile: bool = False,
    activation_checkpointing: bool = False,
    precision: str = "auto",
) -> torch.nn.Module:
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
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # see is_fsdp

        bf16 = precision == "bf16" or (precision == "auto" and env.device.type == "cuda")
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        for block in model.blocks:
            if compile:
                block.compile()  # in place: the block stays the module fully_shard wraps
            fully_shard(block, mp_policy=mp)
        # the root holds the embedding and the tied LM head (one parameter); it is needed again right at the start
        # of backward (the fused loss at the end of forward forms its gradient there): keep it unsharded
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)
        return model
    if strategy == "ddp":
        # buffers (RoPE tables) are computed identically on every rank: no broadcast, so evaluation on a share of
        # the batches needs no collective in forward
        no_buffer_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False}
        )
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


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for plain and DTensor (FSDP) gradients; returns the total norm as a plain
    tensor, the same on every rank."""
    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0)
    if _is_dtensor(total):
        total = total.full_tensor()  # the sharded norms' reduction (a collective)
    if max_norm != float("inf"):  # no clipping asked: leave the gradients alone
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


# ---------------------------------------------------------------------------------------------- collectives
def rank0_succeeded(ok: bool) -> bool:
    """Rank 0's `ok` on every rank (a broadcast, so also a barrier): the other ranks wait for what rank 0 alone
    does (writing a checkpoint) and learn whether it worked. One process: `ok` itself."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    verdict = [ok if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    return bool(verdict[0])


def get_rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """The ranks of the process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_mean(metrics: dict, op: str = "mean") -> dict:
    """The mean (or with `op` the "sum" or "max") over ranks of each 0-d tensor in `metrics` (one collective; a
    no-op with one rank)."""
    if not metrics or not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)  # the same order on every rank
    flat = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).reshape(()) for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        flat /= dist.get_world_size()
    reduced = dict(zip(keys, flat.unbind()))
    return {k: reduced[k] for k in metrics}


def reduce_sums(sums: dict, count):
    """Sum `sums` (0-d tensors) and `count` over ranks (one collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sums, count
    keys = sorted(sums)
    device = sums[keys[0]].device if keys else torch.device("cpu")
    flat = torch.stack(
        [torch.as_tensor(sums[k], dtype=torch.float32, device=device).reshape(()) for k in keys]
        + [torch.tensor(float(count), device=device)]
    )
    dist.all_reduce(flat)
    return dict(zip(keys, flat[:-1].unbind())), flat[-1]


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank (one collective; `[obj]` for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_indices(indices: list, rank: int, world_size: int) -> list:
    """This rank's share of `indices` (every world_size-th from its rank), padded with the first index so every
    rank gets the same number (FSDP forwards are collectives): the gathered results carry each index once per
    rank that scored it, so the one who gathers keeps one result per index."""
    share = list(indices[rank::world_size])
    rounds = math.ceil(len(indices) / world_size) if indices else 0
    return share + [indices[0]] * (rounds - len(share))


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
