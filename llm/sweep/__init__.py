"""Sweeps: the summary a sweep is decided from and its Hydra callback (`summary`), a sweep job's continuation,
failure record and trial settings (`jobs`), and a trial's Optuna pruning (`pruning`). The Optuna sweeper itself
is in hydra_plugins/llm_optuna_sweeper/, where Hydra finds it."""
