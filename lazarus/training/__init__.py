"""Trainers: one file per paradigm, all on the same Loop."""

from lazarus.training.base import Trainer, TrainerConfig
from lazarus.training.dpo import DPOConfig, DPOTrainer, DPOTrainerConfig, dpo_loss
from lazarus.training.generation import Completions, generate_completions
from lazarus.training.grpo import GRPOConfig, GRPOTrainer, group_advantages, grpo_loss, k3_kl
from lazarus.training.kto import KTOConfig, KTOTrainer, kto_loss
from lazarus.training.online_rl import OnlineRLConfig, OnlineRLTrainer
from lazarus.training.orpo import ORPOConfig, ORPOTrainer, orpo_loss
from lazarus.training.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer, gae, ppo_loss, whiten
from lazarus.training.reward import RewardConfig, RewardModel, RewardTrainer, bradley_terry_loss
from lazarus.training.rewards import RewardError, RewardFunctions, exact_match
from lazarus.training.sft import SFTConfig, SFTTrainer
from lazarus.training.simpo import SimPOConfig, SimPOTrainer, simpo_loss

__all__ = ["Trainer", "TrainerConfig", "SFTTrainer", "SFTConfig", "DPOTrainer", "DPOTrainerConfig", "DPOConfig",
           "dpo_loss", "GRPOTrainer", "GRPOConfig", "grpo_loss", "group_advantages", "k3_kl", "PPOTrainer",
           "PPOConfig", "PolicyWithValueHead", "ppo_loss", "gae", "whiten", "RewardError", "RewardFunctions",
           "exact_match", "OnlineRLConfig", "OnlineRLTrainer", "Completions", "generate_completions", "RewardTrainer",
           "RewardConfig", "RewardModel", "bradley_terry_loss", "ORPOTrainer", "ORPOConfig", "orpo_loss",
           "SimPOTrainer", "SimPOConfig", "simpo_loss", "KTOTrainer", "KTOConfig", "kto_loss"]
