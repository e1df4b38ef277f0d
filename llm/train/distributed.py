"""Where the process runs and how the plain model is prepared for it: device choice, rank/world size from the
environment (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK), activation checkpointing and torch.compile, applied
after the model is built. The training loop only sees the returned module."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from llm.errors import ConfigError, check_choice

STRATEGIES = ("single",)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> torch.device:
    check_choice("trainer.device", device, {"auto", "cpu", "cuda"})
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
    return torch.device(device)


def dist_env(device: str = "auto") -> DistEnv:
    """Rank, world size and device of this process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return DistEnv(rank, world, local_rank, dev)


def parallelize(model: torch.nn.Module, env: DistEnv, strategy: str = "single", compile: bool = False,
                activation_checkpointing: bool = False) -> torch.nn.Module:
    """Move the model to its device and apply the chosen wrappers. Returns the module to train."""
    check_choice("trainer.strategy", strategy, set(STRATEGIES))
    if env.world_size > 1:
        raise ConfigError(f"trainer.strategy={strategy} runs one process, but WORLD_SIZE={env.world_size}")
    model = model.to(env.device)
    if activation_checkpointing:
        for block in model.blocks:
            block.activation_checkpointing = True
    if compile:
        model = torch.compile(model)
    return model
