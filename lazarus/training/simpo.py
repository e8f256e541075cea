"""Simple Preference Optimisation (SimPO, Meng et al. 2024): a length-normalised, reference-free
reward with a target margin. TRL implements it as ``CPOTrainer(loss_type="simpo")``; this is that
loss, with CPO's optional NLL term (``cpo_alpha``, off by default here: plain SimPO)."""

from __future__ import annotations

import mlx.nn as nn
from pydantic import Field

from lazarus.training.base import TrainerConfig
from lazarus.training.pairwise import PairwiseTrainer, preference_logps, reward_metrics


def simpo_loss(chosen_logps, rejected_logps, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
    """Per-pair SimPO losses from per-token *mean* log-probs (TRL's ``cpo_loss``, ``simpo`` branch).

    ``h = (c - r) - gamma / beta``; ``loss = -(1 - e) logsigmoid(beta h) - e logsigmoid(-beta h)``.
    Returns ``(losses, chosen_rewards, rejected_rewards)`` with rewards ``beta * logps``."""
    h = (chosen_logps - rejected_logps) - gamma / beta
    losses = -(1 - label_smoothing) * nn.log_sigmoid(beta * h) - label_smoothing * nn.log_sigmoid(-beta * h)
    return losses, beta * chosen_logps, beta * rejected_logps


class SimPOConfig(TrainerConfig):
    """SimPO settings; the shared fields are :class:`TrainerConfig`'s. ``batch_size`` counts pairs."""

    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward (SimPO paper default)")
    gamma: float = Field(0.5, ge=0, description="Target reward margin (TRL's simpo_gamma; SimPO paper default)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed label noise (conservative loss)")
    cpo_alpha: float = Field(0.0, ge=0, description="Weight of the chosen responses' NLL (CPO-SimPO); 0: plain "
                                                    "SimPO (TRL's CPOConfig defaults to 1.0)")
    learning_rate: float = Field(1e-6, gt=0, description="Learning rate (TRL's CPOConfig default)")
    target_reward_margin: float | None = Field(
        None, description="Early stop when rewards/margins (beta x the gap of mean log-probs) reaches it; None: off")


class SimPOTrainer(PairwiseTrainer):
    """``SimPOTrainer(model, tokenizer, SimPOConfig(...)).train("prefs.jsonl")``: no reference model.

    Loss per batch: ``mean(simpo_loss) + cpo_alpha * NLL(chosen)``. Logged as TRL's CPO trainer:
    ``loss``, ``rewards/*`` (``beta * mean log-prob``), ``logps/*`` (per-token means) and
    ``nll_loss`` (the chosen NLL, logged whatever ``cpo_alpha``; TRL logs 0 when it is 0)."""

    config_class = SimPOConfig

    def compute_loss(self, model, batch):
        c = self.config
        chosen, rejected, nll = preference_logps(model, batch)
        losses, cr, rr = simpo_loss(chosen, rejected, c.beta, c.gamma, c.label_smoothing)
        loss = losses.mean() + c.cpo_alpha * nll if c.cpo_alpha else losses.mean()
        return loss, {**reward_metrics(cr, rr, chosen, rejected), "nll_loss": nll}
