"""Supervised fine-tuning: token-mean cross-entropy over response tokens."""

from __future__ import annotations

import math

import mlx.core as mx
from pydantic import Field

from lazarus.data import SFTDataset
from lazarus.training.base import Trainer, TrainerConfig, token_logps


class SFTConfig(TrainerConfig):
    mask_prompt: bool = Field(True, description="Exclude prompt tokens from the loss")

    def dataset_kwargs(self) -> dict:
        return {"max_length": self.max_length, "mask_prompt": self.mask_prompt}


class SFTTrainer(Trainer):
    """``SFTTrainer(model, tokenizer, SFTConfig(...), callbacks=[...]).train(dataset)``.

    Loss: mean over target tokens of the batch (and, with accumulation or several ranks,
    over all target tokens of the optimizer step). Logged: ``loss``, ``ppl``,
    ``tokens_per_second`` (target tokens), ``eval/loss`` with an eval set."""

    config_class = SFTConfig
    dataset_class = SFTDataset

    def as_dataset(self, data):
        if isinstance(data, SFTDataset):
            data.mask_prompt = self.config.mask_prompt
            return data
        if data is None or hasattr(data, "collate"):
            return data
        return SFTDataset(data, self.tokenizer, **dict(self.config.dataset_kwargs(), max_length=self.max_length()))

    def compute_loss(self, model, batch):
        logps = token_logps(model, batch["inputs"], batch["targets"])
        mask = batch["mask"]
        ntok = mx.maximum(mask.sum(), 1.0)
        loss = -(logps * mask).sum() / ntok
        return loss, {}

    def derived_metrics(self, logged: dict) -> dict:
        loss = logged.get("loss")
        return {"ppl": math.exp(min(loss, 50.0))} if loss is not None and math.isfinite(loss) else {}
