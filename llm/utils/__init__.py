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
