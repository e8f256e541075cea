"""Training paradigms by name: ``name -> (trainer class, config class)``, what ``lazarus train NAME`` runs.

A new objective makes itself a CLI subcommand with one line::

    from lazarus.training.registry import register
    register("simpo", SimPOTrainer, SimPOConfig, "simple preference optimisation")

The command line builds every registered trainer the same way, with keywords:
``trainer_class(model=..., tokenizer=..., config=..., callbacks=..., reference_model=...)``, plus
``reward_fn=``/``reward_weights=`` for a paradigm registered with ``reward=True``; it turns the data
files into datasets with ``trainer.as_dataset``. The flags only decide which run keys the
paradigm accepts (``reference_model``; ``reward`` and ``reward_weights``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

from lazarus.data import PreferenceDataset, PromptDataset, SFTDataset, UnpairedDataset
from lazarus.training.base import Trainer, TrainerConfig
from lazarus.training.dpo import DPOTrainer, DPOTrainerConfig
from lazarus.training.grpo import GRPOConfig, GRPOTrainer
from lazarus.training.kto import KTOConfig, KTOTrainer
from lazarus.training.orpo import ORPOConfig, ORPOTrainer
from lazarus.training.ppo import PPOConfig, PPOTrainer
from lazarus.training.reward import RewardConfig, RewardTrainer
from lazarus.training.sft import SFTConfig, SFTTrainer
from lazarus.training.simpo import SimPOConfig, SimPOTrainer

#: What one line of data looks like, by the dataset class a trainer turns paths into (``--help`` text).
DATA_FORMATS = {
    SFTDataset: '{"prompt", "response"} or {"messages"}',
    PreferenceDataset: '{"prompt", "chosen", "rejected"}',
    PromptDataset: '{"prompt", <other columns passed to the reward>}',
    UnpairedDataset: '{"prompt", "completion", "label": true|false}',
}


@dataclass(frozen=True)
class Paradigm:
    """One registered paradigm: what ``lazarus train NAME`` builds, and how it is described."""

    name: str
    trainer_class: type[Trainer]
    config_class: type[TrainerConfig]
    description: str
    data_format: str
    reference_model: bool = False  # compares against a frozen reference (run key reference_model)
    reward: bool = False  # online RL: scored by reward functions (run keys reward, reward_weights)


_PARADIGMS: dict[str, Paradigm] = {}
#: A read-only, live view of the registry: ``{name: Paradigm}``.
PARADIGMS = MappingProxyType(_PARADIGMS)


def register(name: str, trainer_class: type[Trainer], config_class: type[TrainerConfig], description: str = "",
             *, data_format: str = "", reference_model: bool = False, reward: bool = False,
             replace: bool = False) -> Paradigm:
    """Make ``lazarus train NAME`` train ``trainer_class`` configured by ``config_class``.

    ``data_format`` (shown in ``--help``) defaults to the one of the trainer's ``dataset_class``;
    ``reference_model``: the trainer takes a frozen reference model; ``reward``: it takes reward
    functions (``reward_fn``, ``reward_weights``). Registering a taken name is an error unless
    ``replace``."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"a paradigm name is lower-case letters, digits, '-' or '_', got {name!r}")
    if name in _PARADIGMS and not replace:
        raise ValueError(f"paradigm {name!r} is already registered ({_PARADIGMS[name].trainer_class.__name__}); "
                         "pass replace=True to replace it")
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"trainer_class must be a Trainer subclass, got {trainer_class!r}")
    if not (isinstance(config_class, type) and issubclass(config_class, TrainerConfig)):
        raise TypeError(f"config_class must be a TrainerConfig subclass, got {config_class!r}")
    paradigm = Paradigm(name, trainer_class, config_class, description or f"train with {trainer_class.__name__}",
                        data_format or DATA_FORMATS.get(getattr(trainer_class, "dataset_class", None), ""),
                        reference_model=reference_model, reward=reward)
    _PARADIGMS[name] = paradigm
    return paradigm


def unregister(name: str) -> None:
    """Remove a registered paradigm (no error when there is none)."""
    _PARADIGMS.pop(name, None)


def get(name: str) -> Paradigm:
    """The paradigm registered as ``name``; a KeyError naming the registered ones otherwise."""
    try:
        return _PARADIGMS[name]
    except KeyError:
        raise KeyError(f"no paradigm {name!r} is registered (registered: {', '.join(_PARADIGMS)})") from None


def paradigms() -> list[Paradigm]:
    """Every registered paradigm, in registration order (the order of ``lazarus train`` subcommands)."""
    return list(_PARADIGMS.values())


register("sft", SFTTrainer, SFTConfig, "supervised fine-tuning")
register("dpo", DPOTrainer, DPOTrainerConfig, "direct preference optimisation", reference_model=True)
register("grpo", GRPOTrainer, GRPOConfig, "group relative policy optimisation (online RL)", reference_model=True,
         reward=True)
register("ppo", PPOTrainer, PPOConfig, "proximal policy optimisation (online RL)", reference_model=True, reward=True)
register("orpo", ORPOTrainer, ORPOConfig, "odds ratio preference optimisation (SFT + odds-ratio penalty, no reference)")
register("simpo", SimPOTrainer, SimPOConfig, "simple preference optimisation (length-normalised, no reference)")
register("kto", KTOTrainer, KTOConfig, "Kahneman-Tversky optimisation (unpaired desirable/undesirable examples)",
         reference_model=True)
register("reward", RewardTrainer, RewardConfig, "reward model: Bradley-Terry scalar head on preference pairs",
         data_format='{"prompt", "chosen", "rejected"[, "margin"]}')
