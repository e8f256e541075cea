"""Odds Ratio Preference Optimisation (ORPO, Hong et al. 2024): SFT on the chosen response plus an
odds-ratio penalty on the rejected one, with no reference model. The math follows TRL's
``ORPOTrainer``; see docs/objectives.md for the formula and the metrics."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from pydantic import Field

from lazarus.callbacks import EarlyStopping
from lazarus.data import PreferenceDataset
from lazarus.training.base import Trainer, TrainerConfig, token_logps

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


def preference_logps(model, batch, nll_with_prompt: bool = False):
    """``(mean_chosen, mean_rejected, nll)`` of a preference batch (chosen rows, then rejected):
    each response's per-token mean log-prob, and the chosen rows' cross-entropy averaged over all
    their target tokens (``torch.nn.CrossEntropyLoss``, as TRL): the response tokens, or with
    ``nll_with_prompt`` every token of the sequence but the first (TRL's ORPO), padding aside."""
    mask = batch["mask"]
    logps = token_logps(model, batch["inputs"], batch["targets"])
    means = (logps * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)
    n = mask.shape[0] // 2
    chosen = mask[:n]
    if nll_with_prompt:  # a row's sequence ends where its response does; padding follows
        position = mx.arange(mask.shape[1], dtype=mx.float32)
        chosen = (position <= (chosen * position).max(-1, keepdims=True)).astype(mx.float32)
    nll = -(logps[:n] * chosen).sum() / mx.maximum(chosen.sum(), 1.0)
    return means[:n], means[n:], nll


def reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """TRL's pairwise metrics: ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
            "logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean()}


class PairwiseTrainer(Trainer):
    """What reference-free preference trainers (ORPO, SimPO) share: preference pairs as data
    (``{"prompt", "chosen", "rejected"}``; a batch holds the chosen rows, then the rejected rows,
    ``loss_weight`` = pairs) and ``EarlyStopping(target_reward_margin=...)`` from the config."""

    dataset_class = PreferenceDataset

    def default_callbacks(self):
        cbs = super().default_callbacks()
        if self.config.target_reward_margin is not None:
            cbs.append(EarlyStopping(target_reward_margin=self.config.target_reward_margin))
        return cbs

    def as_dataset(self, data):
        if data is None or hasattr(data, "collate"):
            return data
        return PreferenceDataset(data, self.tokenizer, max_length=self.max_length())


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
