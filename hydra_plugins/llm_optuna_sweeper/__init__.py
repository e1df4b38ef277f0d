"""`hydra/sweeper=optuna`: an Optuna search that survives a crash (llm's own sweeper, for current Optuna)."""
