"""The run dir's Hydra side: the claim a Hydra job makes on its dir (`claim_run_dir`), and the OmegaConf resolvers
conf/hydra/default.yaml uses (a sweep job's dir name, where `.hydra/` is written). Importing this module registers
the resolvers (run.py imports it, and so do SLURM tasks that unpickle run.py's task function)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from llm.dist.env import env_rank
from llm.errors import ConfigError
from llm.rundir import owner


def claim_run_dir(cfg: DictConfig, run_dir: Path, in_sweep: bool = False) -> owner.RunDirLock | None:
    """The run dir's lock for this Hydra job (rank 0 only: the ranks of torchrun / srun share the dir), after
    checking that this run may write there (see llm.rundir.owner; a sweep job's dir from an earlier attempt of
    the same sweep is its own: `continue_sweep_job` decides). The lock taken when Hydra asked where `.hydra/`
    goes (`hydra_output_subdir`) is this one. None on the other ranks."""
    if env_rank() != 0:
        return None
    _, held = _DECIDED.pop(_key(run_dir), (None, None))
    if in_sweep:
        return held or owner.RunDirLock(run_dir).acquire()
    return owner.claim(run_dir, cfg.get("resume"), bool(cfg.get("overwrite")), held)


def release_unclaimed() -> None:
    """Let go of the locks taken for `.hydra/` whose job never claimed them (Hydra failed in between): for the
    end of run.py, and for several runs in one interpreter."""
    while _DECIDED:
        _, (_, lock) = _DECIDED.popitem()
        if lock is not None:
            lock.release()


def safe_dirname(name: str, max_len: int = 120) -> str:
    """A sweep job's dir name from its overrides: '/' replaced, and names longer than max_len cut with a short
    hash of the whole appended (file systems refuse names over 255 bytes)."""
    name = str(name).replace("/", "_")
    if len(name) <= max_len:
        return name
    return name[: max_len - 9] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]


# run dir -> (where `.hydra/` goes, the lock taken to write it): Hydra asks more than once (`output_subdir is not
# None`, then the path), and every answer must be the first; `claim_run_dir` takes the lock over
_DECIDED: dict[str, tuple[str | None, owner.RunDirLock | None]] = {}


def _key(run_dir) -> str:
    return str(Path(run_dir).absolute())


def hydra_output_subdir(default: str = ".hydra", resume=None, overwrite=False) -> str | None:
    """Only rank 0 writes Hydra's `.hydra/` (the other ranks of torchrun / srun compose the same config), and never
    into a dir that another process writes or that holds a run, unless overwrite=true replaces it: a resumed run
    keeps the first run's `.hydra/`, and a run that is refused changes nothing there.

    A run that may write `.hydra/` takes the run dir's lock here, before it writes anything, and keeps it for
    `claim_run_dir`: of two runs started into one dir, the first to lock it owns it, and the other is refused in
    one line by its claim. Asking whether the dir is in use and locking it later would leave a window in which
    the answer changes between Hydra's two questions."""
    if env_rank() != 0:
        return None
    runtime = HydraConfig.get().runtime if HydraConfig.initialized() else None
    run_dir = None if runtime is None or OmegaConf.is_missing(runtime, "output_dir") else runtime.output_dir
    if not run_dir:  # composed without a run (the compose API, --cfg)
        return default
    key = _key(run_dir)
    if key not in _DECIDED:
        _DECIDED[key] = _decide(run_dir, default, resume, overwrite)
    return _DECIDED[key][0]


def _decide(run_dir: str, default: str, resume, overwrite) -> tuple[str | None, owner.RunDirLock | None]:
    replacing = overwrite is True and not resume  # with resume too, the run is refused
    if owner.artefacts(run_dir) and not replacing:
        return None, None  # another run's, or this one's to resume: its claim decides
    try:
        return default, owner.RunDirLock(run_dir).acquire()
    except ConfigError:  # in use: the claim refuses this run
        return None, None
    except OSError:  # the lock cannot even be made (read-only, a name too long): the claim says why in one line
        return default, None


OmegaConf.register_new_resolver("safe_dirname", safe_dirname, replace=True)
OmegaConf.register_new_resolver("llm_output_subdir", hydra_output_subdir, replace=True)
