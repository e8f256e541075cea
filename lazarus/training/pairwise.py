"""What the pairwise preference trainers (DPO, ORPO, SimPO; KTO through DPO) share: preference pairs
as data, a batch's chosen and rejected log-probs, TRL's pairwise metrics, and early stopping on the
reward margin."""

from __future__ import annotations

import mlx.core as mx

from lazarus.callbacks import EarlyStopping
from lazarus.data import PreferenceDataset
from lazarus.training.base import Trainer, token_logps


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
    """What preference trainers share: preference pairs as data
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
        from lazarus.data.formats import format_options

        return PreferenceDataset(data, self.tokenizer, max_length=self.max_length(),
                                 **format_options(self.config, PreferenceDataset))
