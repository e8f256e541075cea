"""Direct Preference Optimisation against a cached, frozen reference."""

from __future__ import annotations

import contextlib
from typing import Literal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from pydantic import Field, model_validator

from lazarus import _blas
from lazarus.data.batching import DataLoader
from lazarus.models.lora import adapters_disabled, lora_settings
from lazarus.training.base import StrictConfig, TrainerConfig, token_logps
from lazarus.training.pairwise import PairwiseTrainer, reward_metrics


class DPOConfig(StrictConfig):
    """The DPO objective. ``beta`` scales the implicit reward (KL strength)."""

    beta: float = Field(0.1, gt=0, description="KL penalty coefficient")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="DPO loss variant")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO: assumed label noise "
                                   "(sigmoid loss only)")
    rpo_alpha: float | None = Field(None, ge=0, description="RPO: add this times the chosen responses' NLL (mean "
                                    "per token) to the loss, which keeps DPO from lowering the likelihood of "
                                    "what it prefers (TRL's rpo_alpha); None: off")

    @model_validator(mode="after")
    def _check(self):
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing={self.label_smoothing} only applies to loss_type 'sigmoid', not "
                             f"{self.loss_type!r} (TRL ignores it there); set label_smoothing to 0")
        return self


class DPOTrainerConfig(TrainerConfig):
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO objective settings")
    learning_rate: float = Field(1e-6, gt=0, description="Learning rate (lower for DPO)")
    target_reward_margin: float | None = Field(2.0, description="Early stop when rewards/margins reaches it")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair DPO losses and implicit rewards from sequence log-probs (TRL's formulas).

    ``h = (pi_c - pi_r) - (ref_c - ref_r)``; sigmoid: ``-(1-e) logsig(b h) - e logsig(-b h)``;
    ipo: ``(h - 1/(2b))^2``; hinge: ``relu(1 - b h)``. Rewards are ``b (pi - ref)``. The
    log-probs are sums over the response tokens, except for ipo, where they must be per-token
    means (the trainer divides them; on sums the IPO loss grows with length squared)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * nn.log_sigmoid(beta * h) - label_smoothing * nn.log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = nn.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(model, batch):
    """Summed log-probs of the response tokens of each row."""
    return (token_logps(model, batch["inputs"], batch["targets"]) * batch["mask"]).sum(-1)


class DPOTrainer(PairwiseTrainer):
    """``DPOTrainer(policy, reference, tokenizer, DPOTrainerConfig(...))``.

    The reference never gets gradients: its log-probs are computed once for the whole
    dataset before training, cached, and saved in checkpoints. ``reference_model=None``
    uses the policy itself as it is before training, with LoRA adapters disabled when it
    has them (no second copy of the weights)."""

    config_class = DPOTrainerConfig

    def __init__(self, model, reference_model=None, tokenizer=None, config: DPOTrainerConfig | None = None,
                 callbacks=None, optimizer=None):
        # positional order (policy, reference, tokenizer, config); as keywords the reference may be left out.
        # The tokenizer may be None for a trainer that only computes losses on ready-made batches.
        if reference_model is not None and not isinstance(reference_model, nn.Module):
            raise TypeError(f"reference_model must be an mlx.nn.Module or None, got {type(reference_model).__name__} "
                            "(positional order: DPOTrainer(policy, reference, tokenizer, config))")
        self.reference_model = reference_model
        self.ref_cache: dict[str, np.ndarray] = {}
        self._cache_datasets: dict = {}
        super().__init__(model, tokenizer, config, callbacks, optimizer)
        if reference_model is not None:
            reference_model.freeze()
            reference_model.eval()

    # ---- reference cache -------------------------------------------------------------
    def collate_fn(self, dataset, split):
        def collate(indices, pad_multiple=8):
            batch = dataset.collate(indices, pad_multiple)
            cache = self.ref_cache[split]
            batch["ref_chosen"] = mx.array(cache[0][indices])
            batch["ref_rejected"] = mx.array(cache[1][indices])
            return batch
        return collate

    def reference_logps(self, dataset) -> np.ndarray:
        """(2, N) float32 array of reference log-probs of chosen and rejected responses."""
        ref = self.reference_model
        out = np.zeros((2, len(dataset)), dtype=np.float32)
        # no gradients here, so larger batches than training are cheap and faster
        loader = DataLoader(dataset, 4 * self.config.batch_size, shuffle=False, bucket=True)
        use_lora_ref = ref is None and lora_settings(self.model) is not None
        model_for_ref = ref if ref is not None else self.model
        streams = list(self.loop.streams) if self.loop is not None else []
        # one function per stream: a compiled graph keeps the stream it was traced on
        fns = [lambda b: sequence_logps(model_for_ref, b) for _ in (streams or [None])]  # noqa: E731
        if self.config.compile:  # one fused graph per batch shape: faster than op by op on CPU
            fns = [mx.compile(f, inputs=[model_for_ref.state]) for f in fns]
        was_training = model_for_ref.training
        model_for_ref.eval()
        try:
            with adapters_disabled(self.model) if use_lora_ref else contextlib.nullcontext():
                self._fill(loader, fns, streams, out, self.loop.ranks if self.loop is not None else None)
        finally:
            model_for_ref.train(was_training)
        return out

    @staticmethod
    def _fill(loader, fns, streams, out, ranks=None):
        """Reference log-probs of every pair; with several CPU streams each batch is split into
        one part per stream (padded to the batch's width) and the parts run side by side. With
        several data-parallel ranks each computes every ``size``-th batch and one ``all_sum``
        (the others add exact zeros) gives every rank the whole cache: a rank's share of the
        pass, not all of it."""
        rank, size = (ranks.rank, ranks.size) if ranks is not None else (0, 1)
        with _blas.threads_for_streams(max(1, len(streams))):
            for i in range(rank, len(loader), size):
                idx = loader.batch_indices(0, i)
                parts = loader.get_batch_shards(0, i, len(fns)) if len(fns) > 1 else [loader.get_batch(0, i)]
                pieces = []
                for j, batch in enumerate(parts):
                    arrays = {k: v for k, v in batch.items() if isinstance(v, mx.array)}
                    with mx.stream(streams[j]) if streams else contextlib.nullcontext():
                        pieces.append(mx.stop_gradient(fns[j](arrays)))
                # chosen rows come first, then rejected, in each part
                chosen = mx.concatenate([p[: p.shape[0] // 2] for p in pieces])
                rejected = mx.concatenate([p[p.shape[0] // 2:] for p in pieces])
                mx.eval(chosen, rejected)
                out[0, idx], out[1, idx] = np.array(chosen), np.array(rejected)
        if size > 1:
            out[:] = np.array(ranks.all_sum(mx.array(out)))

    def prepare(self, train_loader, eval_loader, resuming):
        self._cache_datasets = {"train": train_loader.dataset}
        if eval_loader is not None:
            self._cache_datasets["eval"] = eval_loader.dataset
        self.ref_cache = {}
        if not resuming:  # on resume the cache comes from the checkpoint (load_resume_state)
            self._fill_missing_caches()

    def _fill_missing_caches(self):
        for split, ds in self._cache_datasets.items():
            if split not in self.ref_cache or self.ref_cache[split].shape[1] != len(ds):
                self.ref_cache[split] = self.reference_logps(ds)

    def resume_state(self):
        arrays, doc = super().resume_state()
        return {**arrays, **{f"ref_cache.{k}": mx.array(v) for k, v in self.ref_cache.items()}}, doc

    def load_resume_state(self, arrays, doc):
        super().load_resume_state(arrays, doc)
        for k, v in arrays.items():
            if k.startswith("ref_cache."):
                self.ref_cache[k[len("ref_cache."):]] = np.array(v)
        self._fill_missing_caches()  # e.g. an eval set that the interrupted run did not have

    # ---- objective -------------------------------------------------------------------
    def compute_loss(self, model, batch):
        c = self.config.dpo
        per_token = token_logps(model, batch["inputs"], batch["targets"]) * batch["mask"]
        logps = per_token.sum(-1)
        n = logps.shape[0] // 2
        ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
        if c.loss_type == "ipo":  # IPO on per-token mean log-probs, policy and reference alike (TRL)
            ntok = mx.maximum(batch["mask"].sum(-1), 1.0)
            logps, ref_c, ref_r = logps / ntok, ref_c / ntok[:n], ref_r / ntok[n:]
        pc, pr = logps[:n], logps[n:]
        losses, cr, rr = dpo_loss(pc, pr, ref_c, ref_r, c.beta, c.loss_type, c.label_smoothing)
        extra = {}
        if c.rpo_alpha is not None:  # TRL: NLL of the chosen tokens, averaged over all of them
            nll = -per_token[:n].sum() / mx.maximum(batch["mask"][:n].sum(), 1.0)
            losses = losses + c.rpo_alpha * nll
            extra["nll_loss"] = nll
        return losses.mean(), {**reward_metrics(cr, rr, pc, pr), **extra}
