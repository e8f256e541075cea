"""Supervised fine-tuning: token-mean cross-entropy over response tokens."""

from __future__ import annotations

import math

import mlx.core as mx
from pydantic import Field

from lazarus.data import SFTDataset
from lazarus.data.packing import PackedDataLoader
from lazarus.models.mlx_lm_patches import check_packing_supported, packed_attention
from lazarus.training.base import Trainer, TrainerConfig, token_logps


class SFTConfig(TrainerConfig):
    mask_prompt: bool = Field(True, description="Exclude prompt tokens from the loss")
    assistant_only: bool = Field(True, description="messages rows: train on the assistant turns only (every "
                                                   "one of them); false: on every turn")
    packing: bool = Field(False, description="Pack several examples into each row (each attends only to itself); "
                                             "batch_size then counts rows (see training.md)")

    def dataset_kwargs(self) -> dict:
        return {"max_length": self.max_length, "mask_prompt": self.mask_prompt}


class SFTTrainer(Trainer):
    """``SFTTrainer(model, tokenizer, SFTConfig(...), callbacks=[...]).train(dataset)``.

    Loss: mean over target tokens of the batch (and, with accumulation or several ranks,
    over all target tokens of the optimizer step). Logged: ``loss``, ``ppl``,
    ``tokens_per_second`` (target tokens), ``eval/loss`` with an eval set.

    With ``packing: true`` the loader packs examples into rows (:mod:`lazarus.data.packing`) and
    the forward pass attends within each example only (a ``segment_ids`` batch entry): the loss
    and gradients are those of the same examples unpacked."""

    config_class = SFTConfig
    dataset_class = SFTDataset

    def as_dataset(self, data):
        if isinstance(data, SFTDataset):
            data.mask_prompt = self.config.mask_prompt
            return data
        if data is None or hasattr(data, "collate"):
            return data
        from lazarus.data.formats import format_options

        return SFTDataset(data, self.tokenizer, **dict(self.config.dataset_kwargs(), max_length=self.max_length(),
                                                       **format_options(self.config, SFTDataset)))

    def make_loader(self, dataset, split: str = "train"):
        if not self.config.packing:
            return super().make_loader(dataset, split)
        c = self.config
        return PackedDataLoader(dataset, c.batch_size, limit=self.max_length(), shuffle=(split == "train"), seed=c.seed)

    def prepare(self, train_loader, eval_loader, resuming: bool) -> None:
        if self.config.packing:
            check_packing_supported(self.model)

    def run_info(self, dataset) -> dict:
        info = super().run_info(dataset)
        loader = self.loop.train_data if self.loop is not None else None
        if isinstance(loader, PackedDataLoader):
            info["packing"] = loader.describe()
        return info

    def compute_loss(self, model, batch):
        with packed_attention(model, batch.get("segment_ids")):
            logps = token_logps(model, batch["inputs"], batch["targets"])
        mask = batch["mask"]
        ntok = mx.maximum(mask.sum(), 1.0)
        loss = -(logps * mask).sum() / ntok
        return loss, {}

    def derived_metrics(self, logged: dict) -> dict:
        loss = logged.get("loss")
        return {"ppl": math.exp(min(loss, 50.0))} if loss is not None and math.isfinite(loss) else {}
