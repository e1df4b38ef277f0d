"""The run dir's Hydra side: the claim a Hydra job makes on its dir (`claim_run_dir`), and the OmegaConf resolvers
conf/hydra/default.yaml uses (a sweep job's dir name, where `.hydra/` is written). Importing this module registers
the resolvers (run.py imports it, and so do SLURM tasks that unpickle run.py's task function)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from llm.dist.env import env_rank
from llm.rundir import owner


def claim_run_dir(cfg: DictConfig, run_dir: Path, in_sweep: bool = False) -> owner.RunDirLock | None:
    """The run dir's lock for this Hydra job (rank 0 only: the ranks of torchrun / srun share the dir), after
    checking that this run may write there (see llm.rundir.owner; a sweep job's dir from an earlier attempt of
    the same sweep is its own: `continue_sweep_job` decides). None on the other ranks."""
    if env_rank() != 0:
        return None
    if in_sweep:
        return owner.RunDirLock(run_dir).acquire()
    return owner.claim(run_dir, cfg.get("resume"), bool(cfg.get("overwrite")))


def safe_dirname(name: str, max_len: int = 120) -> str:
    """A sweep job's dir name from its overrides: '/' replaced, and names longer than max_len cut with a short
    hash of the whole appended (file systems refuse names over 255 bytes)."""
    name = str(name).replace("/", "_")
    if len(name) <= max_len:
        return name
    return name[: max_len - 9] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]


def hydra_output_subdir(default: str = ".hydra", resume=None, overwrite=False) -> str | None:
    """Only rank 0 writes Hydra's `.hydra/` (the other ranks of torchrun / srun compose the same config), and never
    into a dir that another process writes or that holds a run, unless overwrite=true replaces it: a resumed run
    keeps the first run's `.hydra/`, and a run that is refused changes nothing there."""
    if env_rank() != 0:
        return None
    runtime = HydraConfig.get().runtime if HydraConfig.initialized() else None
    run_dir = None if runtime is None or OmegaConf.is_missing(runtime, "output_dir") else runtime.output_dir
    if not run_dir:  # composed without a run (the compose API, --cfg)
        return default
    replacing = overwrite is True and not resume  # with resume too, the run is refused
    if owner.in_use(run_dir) or (owner.artefacts(run_dir) and not replacing):
        return None
    return default


OmegaConf.register_new_resolver("safe_dirname", safe_dirname, replace=True)
OmegaConf.register_new_resolver("llm_output_subdir", hydra_output_subdir, replace=True)
