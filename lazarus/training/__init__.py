"""Trainers: one file per paradigm, all on the same Loop."""

from lazarus.training.base import Trainer, TrainerConfig
from lazarus.training.dpo import DPOConfig, DPOTrainer, DPOTrainerConfig, dpo_loss
from lazarus.training.sft import SFTConfig, SFTTrainer

__all__ = ["Trainer", "TrainerConfig", "SFTTrainer", "SFTConfig", "DPOTrainer", "DPOTrainerConfig", "DPOConfig",
           "dpo_loss"]
