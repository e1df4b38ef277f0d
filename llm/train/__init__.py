"""Training: the one loop (`Trainer`) and what stands beside it — settings, objectives, optimizer and schedule, the
parts of a step, evaluation, results and loggers. The processes of a run are in llm/dist/, checkpoints in
llm/checkpoint/."""

from llm.train.muon import MuonConfig
from llm.train.objectives import DPO, SFT, LanguageModeling
from llm.train.optim import OptimizerConfig
from llm.train.settings import TrainerSettings, trainer_settings
from llm.train.trainer import RunInfo, Trainer

__all__ = [
    "DPO",
    "SFT",
    "LanguageModeling",
    "MuonConfig",
    "OptimizerConfig",
    "RunInfo",
    "Trainer",
    "TrainerSettings",
    "trainer_settings",
]
