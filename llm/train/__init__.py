"""Training: the one loop (`Trainer`), objectives, optimizer and schedule, checkpoints, loggers, distribution."""

from llm.train.objectives import LanguageModeling
from llm.train.optim import OptimizerConfig
from llm.train.trainer import Trainer

__all__ = ["LanguageModeling", "OptimizerConfig", "Trainer"]
