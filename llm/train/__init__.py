"""Training: the one loop (`Trainer`) and what stands beside it — settings, objectives, optimizer and schedule,
checkpoints, loggers, the processes of a run (`cluster`) and the wrapping of the model for them (`parallel`)."""

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
