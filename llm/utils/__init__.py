"""Small helpers for the entry point: seeding, dir names (here) and logging setup (`llm.utils.logging`)."""

import hashlib


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def safe_dirname(name: str, max_len: int = 120) -> str:
    """A sweep job's dir name from its overrides: '/' replaced, and names longer than max_len cut with a short
    hash of the whole appended (file systems refuse names over 255 bytes)."""
    name = str(name).replace("/", "_")
    if len(name) <= max_len:
        return name
    return name[: max_len - 9] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]


def _output_subdir(default: str = ".hydra"):
    from llm.train.distributed import hydra_output_subdir

    return hydra_output_subdir(default)


def register_resolvers() -> None:
    """The OmegaConf resolvers conf/hydra/default.yaml uses: `safe_dirname` (sweep job dir names) and
    `llm_output_subdir` (only rank 0 of a distributed run writes `.hydra/`). Registered on import of this package,
    so every process that resolves the config has them: run.py, and the SLURM tasks of the submitit launcher,
    which unpickle run.py's task function without running run.py."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("safe_dirname", safe_dirname, replace=True)
    OmegaConf.register_new_resolver("llm_output_subdir", _output_subdir, replace=True)


register_resolvers()
