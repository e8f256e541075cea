"""Odds Ratio Preference Optimisation (ORPO, Hong et al. 2024): SFT on the chosen response plus an
odds-ratio penalty on the rejected one, with no reference model. The math follows TRL's
``ORPOTrainer``; see docs/objectives.md for the formula and the metrics."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from pydantic import Field

from lazarus.training.base import TrainerConfig
from lazarus.training.pairwise import PairwiseTrainer, preference_logps, reward_metrics

#: Mean log-probs above this are treated as this value by :func:`log1mexp` (probability 1 - 1e-7
#: per token): log(1 - p) and its gradient stay finite, and the odds-ratio term saturates there.
LOGP_CEILING = -1e-7
_LN2 = math.log(2.0)


def log1mexp(x):
    """``log(1 - exp(x))`` for ``x < 0``, accurate everywhere: ``log(-expm1(x))`` above ``-ln 2``
    (where ``1 - exp(x)`` would lose every digit as ``x`` nears 0), ``log1p(-exp(x))`` below.
    Each branch only sees inputs it is finite on, so the unused branch adds no NaN gradient."""
    near = mx.minimum(x, LOGP_CEILING)
    far = mx.minimum(x, -_LN2)
    return mx.where(x > -_LN2, mx.log(-mx.expm1(near)), mx.log1p(-mx.exp(far)))


def orpo_loss(chosen_logps, rejected_logps, beta: float = 0.1):
    """Per-pair odds-ratio losses from per-token *mean* log-probs (TRL's ``odds_ratio_loss``).

    ``log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r))``; the pair's loss is
    ``-beta * logsigmoid(log_odds)`` (the trainer adds the chosen NLL). Returns
    ``(losses, chosen_rewards, rejected_rewards, log_odds)`` with rewards ``beta * logps``."""
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    losses = -beta * nn.log_sigmoid(log_odds)
    return losses, beta * chosen_logps, beta * rejected_logps, log_odds


class ORPOConfig(TrainerConfig):
    """ORPO settings; the shared fields are :class:`TrainerConfig`'s. ``batch_size`` counts pairs."""

    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (the paper's lambda; TRL's beta)")
    learning_rate: float = Field(1e-6, gt=0, description="Learning rate (TRL's ORPOConfig default)")
    target_reward_margin: float | None = Field(
        None, description="Early stop when rewards/margins (beta x the gap of mean log-probs) reaches it; "
                          "None: off (the NLL term keeps training useful)")


class ORPOTrainer(PairwiseTrainer):
    """``ORPOTrainer(model, tokenizer, ORPOConfig(...)).train("prefs.jsonl")``: no reference model.

    Loss per batch: ``NLL(chosen) - beta * mean(logsigmoid(log_odds))`` on per-token mean
    log-probs of the responses; the NLL is TRL's: the mean cross-entropy of the chosen sequences,
    prompt tokens included. Logged as TRL: ``loss``, ``nll_loss``, ``log_odds_ratio`` (mean logsigmoid),
    ``log_odds_chosen`` (mean log odds), ``rewards/*`` (``beta * mean log-prob``), ``logps/*``."""

    config_class = ORPOConfig

    def compute_loss(self, model, batch):
        chosen, rejected, nll = preference_logps(model, batch, nll_with_prompt=True)
        losses, cr, rr, log_odds = orpo_loss(chosen, rejected, self.config.beta)
        metrics = reward_metrics(cr, rr, chosen, rejected)
        metrics.update({"nll_loss": nll, "log_odds_ratio": nn.log_sigmoid(log_odds).mean(),
                        "log_odds_chosen": log_odds.mean()})
        return nll + losses.mean(), metrics
