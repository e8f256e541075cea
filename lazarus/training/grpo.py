"""Group Relative Policy Optimisation (GRPO) on the Loop.

Each prompt batch becomes one rollout: ``group_size`` completions per prompt are sampled,
scored by the reward functions, and each completion's advantage is its reward relative to
its group (minus the group mean, divided by the group's unbiased std when ``scale_rewards``).
The loss is the PPO-style clipped surrogate per completion token against the sampling policy,
plus ``beta`` times the k3 estimate of KL(policy || reference). ``num_iterations`` passes over a
rollout, each split into ``num_minibatches``, give that many optimizer steps per rollout; when
that is more than one, the sampling policy's log-probs are kept for the ratio. The math follows
TRL's ``GRPOTrainer`` (see docs/grpo_ppo.md for the formulas and the differences).
"""

from __future__ import annotations

import time
from typing import Literal

import mlx.core as mx
import numpy as np
from pydantic import Field

from lazarus.training.base import token_logps
from lazarus.protocols import Rollout
from lazarus.training.online_rl import OnlineRLConfig, OnlineRLTrainer, masked_mean, pack_sequences


class GRPOConfig(OnlineRLConfig):
    """GRPO settings (the shared ones, and their defaults, in :class:`OnlineRLConfig`).
    ``batch_size`` is the number of prompts per rollout (global)."""

    paradigm = "GRPO"

    group_size: int = Field(4, ge=2, description="Completions sampled per prompt")
    clip_epsilon_high: float | None = Field(None, gt=0, description="Upper clip range (DAPO 'clip higher')")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes over each rollout")
    scale_rewards: bool = Field(True, description="Divide group-centred rewards by the group std")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="Token aggregation: grpo = per-sequence mean, dapo = mean over all tokens, "
                            "dr_grpo = sum / (sequences x max_completion_length)")
    mask_truncated_completions: bool = Field(False, description="Exclude completions without EOS from the loss")


def group_advantages(rewards, group_size: int, scale_rewards: bool = True, eps: float = 1e-4):
    """Advantages of ``rewards`` (prompt-major: rows ``[i*G, (i+1)*G)`` share a prompt), as TRL.

    ``A = r - mean(group)``, divided by ``std(group) + eps`` when ``scale_rewards``, where std is
    the unbiased (n - 1) estimate, like ``torch.std``. A NaN reward (a completion that no reward
    function scored) is left out of its group's mean and std and gets advantage 0. Returns
    ``(advantages, group_std)`` as numpy arrays."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    scored = ~np.isnan(g)
    n = scored.sum(axis=1, keepdims=True)
    mean = np.where(scored, g, 0.0).sum(axis=1, keepdims=True) / np.maximum(n, 1)
    adv = np.where(scored, g - mean, 0.0)
    std = np.sqrt((adv ** 2).sum(axis=1, keepdims=True) / np.maximum(n - 1, 1))
    if scale_rewards:
        adv = adv / (std + eps)
    return adv.reshape(-1), std[:, 0]


def k3_kl(logps, ref_logps):
    """Per-token k3 estimate of KL(policy || reference): ``exp(d) - d - 1`` with
    ``d = ref - logp``; never negative, 0 where the two agree."""
    d = ref_logps - logps
    return mx.exp(d) - d - 1.0


def grpo_loss(logps, mask, advantages, old_logps=None, ref_logps=None, *, beta: float = 0.0,
              clip_epsilon: float = 0.2, clip_epsilon_high: float | None = None, loss_type: str = "dapo",
              max_completion_length: int | None = None, normalizer=None):
    """The GRPO objective from per-token log-probs (TRL's formula).

    ``logps``/``old_logps``/``ref_logps``/``mask``: (N, T); ``advantages``: (N,).
    ``old_logps=None`` means the batch was sampled by the current weights (its generation feeds
    this one optimizer step): the ratio is then exactly 1 in value while its gradient is that of
    ``logps``. ``normalizer`` (dapo only): what the masked token sum is divided by; the trainer
    passes the generation batch's completion tokens / ranks (TRL), None uses this batch's tokens.
    Returns ``(loss, metrics)`` with ``clip_ratio`` (share of tokens whose clipped term is the
    active one) and, with a reference, ``kl`` (token mean of k3)."""
    old = mx.stop_gradient(logps) if old_logps is None else old_logps
    ratio = mx.exp(logps - old)
    adv = advantages[:, None]
    low = clip_epsilon
    high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
    surrogate = mx.minimum(ratio * adv, mx.clip(ratio, 1.0 - low, 1.0 + high) * adv)
    per_token = -surrogate
    metrics = {}
    if ref_logps is not None and beta > 0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask)
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(axis=1) / mx.maximum(mask.sum(axis=1), 1.0)).mean()
    elif loss_type == "dapo":
        loss = masked.sum() / (mx.maximum(mask.sum(), 1.0) if normalizer is None else normalizer)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        loss = masked.sum() / (mask.shape[0] * max_completion_length)
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}")
    clipped = ((ratio < 1.0 - low) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
    metrics["clip_ratio"] = masked_mean(clipped.astype(mx.float32), mask)
    return loss, metrics


class GRPOTrainer(OnlineRLTrainer):
    """``GRPOTrainer(model, tokenizer, GRPOConfig(...), reward_fn=fn).train(prompts)``.

    ``reward_funcs=[f, g]`` with ``reward_weights=[1.0, 0.5]`` combines several rewards;
    ``reward_model=`` (a trained :class:`~lazarus.training.RewardModel` or its folder) adds a learned
    one, weighted by the last entry of ``reward_weights`` (see :class:`OnlineRLTrainer`).
    ``reference_model`` is only used when ``beta > 0`` (see :class:`OnlineRLTrainer`).

    Logged: ``loss``, ``reward``, ``reward_std`` (mean within-group std), ``rewards/<name>``,
    ``frac_reward_zero_std``, ``clip_ratio``, ``kl`` (beta > 0), ``completions/mean_length``,
    ``completions/clipped_ratio`` (share that hit max_completion_length), and
    ``timing/rollout_share`` (share of wall time spent in rollouts)."""

    config_class = GRPOConfig

    def steps_per_rollout(self) -> int:
        return self.config.num_iterations * self.config.num_minibatches

    def rollout(self, state, prompt_batch) -> Rollout:
        t0 = time.perf_counter()
        c = self.config
        comps, prompts, columns = self.sample(prompt_batch, c.group_size)
        total, per = self.rewards(prompts, comps.texts, columns)
        unscored = np.all([np.isnan(v) for v in per.values()], axis=0)  # every function returned None
        adv, group_std = group_advantages(np.where(unscored, np.nan, total), c.group_size, c.scale_rewards)
        inputs, targets, mask = pack_sequences(comps.prompt_ids, comps.completion_ids, self.pad_id)
        if c.mask_truncated_completions:
            mask = mask * np.asarray(comps.finished, dtype=np.float32)[:, None]
        n = len(comps)
        arrays = {"inputs": mx.array(inputs), "targets": mx.array(targets), "mask": mx.array(mask),
                  "advantages": mx.array(adv.astype(np.float32))}
        chunk = -(-n // c.num_minibatches)
        if self.steps_per_rollout() > 1:
            # after the first step the weights have moved: later steps need the sampler's log-probs
            arrays["old_logps"] = self.policy_logps(arrays["inputs"], arrays["targets"], chunk)
        if self.needs_reference():
            arrays["ref_logps"] = self.reference_logps(arrays["inputs"], arrays["targets"], chunk)
        metrics = {"reward": float(total.mean()), "reward_std": float(group_std.mean()),
                   **self._per_reward_means(per),
                   "frac_reward_zero_std": float(np.mean(group_std < 1e-6)), **comps.metrics()}
        if c.loss_type == "dapo":
            # TRL: each rank divides its minibatch's token sum by (completion tokens of the whole
            # generation batch, all ranks) / ranks, and ranks are averaged with equal weight
            world = self.loop.world_size if self.loop is not None else 1
            normalizer = mx.array(max(self.all_ranks_sum(float(mask.sum())), 1.0) / world)
        batches = []
        for idx, part in self.minibatches(arrays, n, c.num_iterations, state.step, salt=7):
            if c.loss_type == "dapo":
                part.update(loss_normalizer=normalizer, loss_weight=mx.array(1.0))
            else:  # a mean over this rank's sequences: weighted by their number
                part["loss_weight"] = mx.array(float(len(idx)))
            batches.append({**part, "num_tokens": int(mask[idx].sum())})
        return self.rollout_result(t0, batches, metrics, n)

    def compute_loss(self, model, batch):
        c = self.config
        logps = token_logps(model, batch["inputs"], batch["targets"], c.temperature)
        loss, metrics = grpo_loss(logps, batch["mask"], batch["advantages"], batch.get("old_logps"),
                                  batch.get("ref_logps"), beta=c.beta, clip_epsilon=c.clip_epsilon,
                                  clip_epsilon_high=c.clip_epsilon_high, loss_type=c.loss_type,
                                  max_completion_length=c.max_completion_length,
                                  normalizer=batch.get("loss_normalizer"))
        return loss, metrics
