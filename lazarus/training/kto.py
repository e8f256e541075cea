"""Kahneman-Tversky Optimisation (KTO, Ethayarajh et al. 2024) on unpaired feedback: each example
is one completion labelled desirable or undesirable. The math follows TRL's ``KTOTrainer``
(``loss_type="kto"``); see docs/objectives.md for the formulas, the KL estimate and the metrics."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
from pydantic import Field

from lazarus.callbacks import Callback
from lazarus.data import DataLoader, UnpairedDataset
from lazarus.training.base import TrainerConfig
from lazarus.training.dpo import DPOTrainer, sequence_logps


class KTOConfig(TrainerConfig):
    """KTO settings; the shared fields are :class:`TrainerConfig`'s. ``batch_size`` counts examples."""

    beta: float = Field(0.1, gt=0, description="Scale of the implicit reward beta x log(pi/ref) (KL strength)")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the losses of desirable (label true) examples")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the losses of undesirable (label false) "
                                                             "examples")
    batch_size: int = Field(4, ge=2, description="Global batch (examples per micro-step, split across ranks); "
                                                 ">= 2: the KL estimate pairs each prompt with another completion")
    learning_rate: float = Field(1e-6, gt=0, description="Learning rate (TRL's KTOConfig default)")
    target_reward_margin: float | None = Field(2.0, description="Early stop when rewards/margins reaches it")


def kto_loss(policy_logps, ref_logps, labels, kl, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """Per-example KTO losses and rewards from summed completion log-probs (TRL's ``kto`` loss).

    ``r = policy - ref``; desirable (``labels`` true): ``w_d (1 - sigmoid(beta (r - kl)))``;
    undesirable: ``w_u (1 - sigmoid(beta (kl - r)))``; ``kl`` is the batch's detached KL
    estimate. Returns ``(losses, rewards)`` with rewards ``beta * r``."""
    r = policy_logps - ref_logps
    desirable = desirable_weight * (1.0 - mx.sigmoid(beta * (r - kl)))
    undesirable = undesirable_weight * (1.0 - mx.sigmoid(beta * (kl - r)))
    return mx.where(labels.astype(mx.bool_), desirable, undesirable), beta * r


# Metrics defined only for batches that have a desirable (chosen) / undesirable (rejected) example,
# or both (margins): compute_loss also returns `_defined/<kind>` (1 or 0) and the metric times it.
_DEFINED_BY = {"rewards/chosen": "chosen", "logps/chosen": "chosen", "rewards/rejected": "rejected",
               "logps/rejected": "rejected", "rewards/margins": "margins"}


def finish_metrics(metrics: dict) -> dict:
    """Turn averaged KTO metrics into TRL's (in place, and returned): a metric that only some
    micro-batches define becomes its mean over those (the average of ``value x defined`` divided by
    the average of ``defined``) and is left out when none defines it; the ``_defined/*`` keys go."""
    flags = {kind: metrics.pop(f"_defined/{kind}", None) for kind in ("chosen", "rejected", "margins")}
    for name, kind in _DEFINED_BY.items():
        if flags[kind] is None or name not in metrics:
            continue
        if flags[kind] > 0:
            metrics[name] = metrics[name] / flags[kind]
        else:
            del metrics[name]
    return metrics


class _FinishEvalMetrics(Callback):
    """Applies :func:`finish_metrics` to each evaluation, before other callbacks read it."""

    order = 5

    def on_eval_end(self, state):
        finish_metrics(state.eval_metrics)
        if state.history and any(k.startswith("eval/") for k in state.history[-1]):
            state.history[-1] = {"step": state.step, **{f"eval/{k}": v for k, v in state.eval_metrics.items()}}


class KTOBatches(DataLoader):
    """KTO's batches: epoch 0's batches (shuffled and length-bucketed as usual) are fixed groups,
    served in a new order every epoch. So each batch's KL rows pair its own prompts with its own
    completions, yet the reference's KL log-probs are computed once. Never split into CPU-stream
    shards: the KL estimate and the metrics are over the whole micro-batch."""

    get_batch_shards = None  # not a ShardedBatchSource: the Loop runs one stream

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        groups = super().epoch_batches(0)
        if epoch == 0 or not self.shuffle:
            return groups
        return [groups[i] for i in np.random.default_rng([self.seed, epoch, 1]).permutation(len(groups))]


def pair_within_batches(loader: DataLoader) -> np.ndarray:
    """Set (and return) ``loader.dataset.kl_partner``: in every batch of 2+ examples, member k's KL
    row takes member k-1's completion (member 0 the last one's: TRL's rotation by one); an example
    in no such batch takes the previous example's."""
    partner = np.roll(np.arange(len(loader.dataset)), 1)
    for group in loader.epoch_batches(0):
        if len(group) > 1:
            partner[group] = np.roll(group, 1)
    loader.dataset.kl_partner = partner
    return partner


class KTOTrainer(DPOTrainer):
    """``KTOTrainer(policy, reference, tokenizer, KTOConfig(...)).train("kto.jsonl")``.

    Data: :class:`UnpairedDataset` (``{"prompt", "completion", "label"}``). The reference is
    handled as DPO's (this class reuses DPOTrainer's cache): ``reference_model=None`` is the policy
    before training (LoRA adapters disabled); its log-probs of every completion and every KL row
    are computed once, cached and saved in checkpoints.

    Per micro-batch: ``z = max(0, mean(policy - ref log-probs of the KL rows))``, detached and
    averaged over the data-parallel ranks; loss = mean of :func:`kto_loss` over the examples.
    Logged as TRL: ``loss``, ``kl`` (z), ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (each over the micro-batches that
    have such examples)."""

    config_class = KTOConfig
    dataset_class = UnpairedDataset
    _ranks = None  # the Loop's Ranks, for the collective of the KL estimate

    def default_callbacks(self):
        return super().default_callbacks() + [_FinishEvalMetrics()]

    def as_dataset(self, data):
        if data is None or hasattr(data, "collate"):
            return data
        return UnpairedDataset(data, self.tokenizer, max_length=self.max_length())

    def make_loader(self, dataset, split: str = "train") -> DataLoader:
        c = self.config
        return KTOBatches(dataset, c.batch_size, shuffle=(split == "train"), seed=c.seed,
                          collate_fn=self.collate_fn(dataset, split))

    def build_loop(self, train_loader, eval_loader=None, **kwargs):
        loop = super().build_loop(train_loader, eval_loader, **kwargs)
        self._ranks = loop.ranks
        return loop

    def collate_fn(self, dataset, split):
        def collate(indices, pad_multiple=8):
            ref = self.ref_cache[split][:, indices]  # (completion, KL row) reference log-probs
            return {**dataset.collate(indices, pad_multiple), "ref_logps": mx.array(ref[0]),
                    "ref_kl_logps": mx.array(ref[1])}
        return collate

    def prepare(self, train_loader, eval_loader, resuming):
        pair_within_batches(train_loader)
        if eval_loader is not None and eval_loader.dataset is not train_loader.dataset:
            pair_within_batches(eval_loader)
        if not resuming:
            self._check_balance(train_loader.dataset)
        super().prepare(train_loader, eval_loader, resuming)  # the reference cache (DPOTrainer)

    def _check_balance(self, dataset) -> None:
        """TRL's advice (the KTO paper's Eq. 8): with unequal numbers of desirable and undesirable
        examples, one of the weights should make w_d n_d / (w_u n_u) fall in [1, 4/3]."""
        labels = np.asarray(dataset.labels()) if hasattr(dataset, "labels") else None
        if labels is None or labels.sum() * 2 == len(labels):
            return
        c = self.config
        nd, nu = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
        d_range = (round(nu * c.undesirable_weight / nd, 2), round(nu * c.undesirable_weight / nd * 1.33, 2))
        u_range = (round(nd * c.desirable_weight / nu / 1.33, 2), round(nd * c.desirable_weight / nu, 2))
        if not (d_range[0] <= c.desirable_weight <= d_range[1] or u_range[0] <= c.undesirable_weight <= u_range[1]):
            warnings.warn(f"{nd} desirable and {nu} undesirable examples: set EITHER desirable_weight in "
                          f"[{d_range[0]}, {d_range[1]}] OR undesirable_weight in [{u_range[0]}, {u_range[1]}] "
                          "(KTO paper, Eq. 8)", stacklevel=3)

    def _all_sum(self, x):
        return self._ranks.all_sum(x) if self._ranks is not None else x

    def compute_loss(self, model, batch):
        c = self.config
        labels = batch["label"]
        n = labels.shape[0]
        rows = {k: batch[k][:n] for k in ("inputs", "targets", "mask")}
        kl_rows = {k: batch[k][n:] for k in ("inputs", "targets", "mask")}
        logps = sequence_logps(model, rows)
        kl_logps = mx.stop_gradient(sequence_logps(model, kl_rows))  # no gradient through the KL rows (TRL)
        rewards = c.beta * mx.stop_gradient(logps - batch["ref_logps"])
        seen = mx.stop_gradient(logps)
        chosen, rejected = labels, 1.0 - labels
        # one collective: the KL sum and count, and the sums behind the metrics, over every rank
        t = self._all_sum(mx.stack([
            (kl_logps - batch["ref_kl_logps"]).sum(), mx.array(float(n)),
            (rewards * chosen).sum(), (seen * chosen).sum(), chosen.sum(),
            (rewards * rejected).sum(), (seen * rejected).sum(), rejected.sum()]))
        kl = mx.maximum(t[0] / t[1], 0.0)
        losses, _ = kto_loss(logps, batch["ref_logps"], labels, kl, c.beta, c.desirable_weight, c.undesirable_weight)
        has_c, has_r = (t[4] > 0).astype(mx.float32), (t[7] > 0).astype(mx.float32)
        rc, rr = t[2] / mx.maximum(t[4], 1.0), t[5] / mx.maximum(t[7], 1.0)
        metrics = {"kl": kl, "rewards/chosen": rc, "logps/chosen": t[3] / mx.maximum(t[4], 1.0),
                   "rewards/rejected": rr, "logps/rejected": t[6] / mx.maximum(t[7], 1.0),
                   "rewards/margins": (rc - rr) * has_c * has_r,
                   "_defined/chosen": has_c, "_defined/rejected": has_r, "_defined/margins": has_c * has_r}
        return losses.mean(), metrics

    def derived_metrics(self, logged: dict) -> dict:
        finish_metrics(logged)  # in place: the Loop logs this dict
        return {}

    def evaluate(self, dataset) -> dict[str, float]:
        return finish_metrics(super().evaluate(dataset))
