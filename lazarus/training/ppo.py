"""Proximal Policy Optimisation (PPO) for language models, on the Loop.

A value head (one linear layer) reads the policy's final hidden states; policy and head
are trained together (``loss = policy_loss + vf_coef * value_loss``). Each rollout:

* sample ``group_size`` completions per prompt and score them (the *score*);
* per-token reward ``r_t = -beta * (logp_t - ref_logp_t)``, plus the score on the last
  completion token;
* GAE advantages (``gamma``, ``gae_lambda``) against the value head's estimates, whitened
  over the rollout's tokens (unbiased variance, as TRL); returns = advantages + values;
* ``ppo_epochs`` passes, each split into ``num_minibatches`` optimizer steps, of the
  clipped policy loss and the clipped value loss.

The value head is part of what the Loop optimises, so it is in every checkpoint
(``value_head.weight``/``value_head.bias`` beside the policy's weights) and resume restores it.
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from pydantic import Field

from lazarus import checkpointing as ckpt
from lazarus.rng import seeded_rng
from lazarus.training.base import logps_from_logits
from lazarus.step import eval_mode
from lazarus.protocols import Rollout
from lazarus.training.online_rl import OnlineRLConfig, OnlineRLTrainer, chunked, masked_mean, pack_sequences


class PPOConfig(OnlineRLConfig):
    """PPO settings (the shared ones, and their defaults, in :class:`OnlineRLConfig`).
    ``batch_size`` is the number of prompts per rollout (global)."""

    paradigm = "PPO"

    beta: float = Field(0.05, ge=0, description="Per-token KL penalty in the reward; 0 needs no reference")
    value_clip_epsilon: float = Field(0.2, gt=0, description="Value clip range around the rollout's values")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    vf_coef: float = Field(0.1, ge=0, description="Value loss coefficient")
    ppo_epochs: int = Field(4, ge=1, description="Optimisation passes over each rollout")
    whiten_advantages: bool = Field(True, description="Normalise advantages over the rollout's tokens")
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from the score of "
                                                                      "completions that hit the length limit")
    learning_rate: float = Field(3e-6, gt=0, description="Peak learning rate (small for RL)")


# ---------------------------------------------------------------------------------- math
def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over the masked positions of each row (numpy).

    ``rewards``, ``values``, ``mask``: (N, T); a row's valid positions are one contiguous
    run (its completion). ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` is 0 after the last
    token); ``A_t = delta_t + gamma lam A_{t+1}``. Returns ``(advantages, returns)`` with
    ``returns = advantages + values``, both 0 outside the mask."""
    r = np.asarray(rewards, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)
    n, t_len = r.shape
    adv = np.zeros_like(r)
    next_adv = np.zeros(n)
    next_val = np.zeros(n)
    for t in range(t_len - 1, -1, -1):
        nxt = m[:, t + 1] if t + 1 < t_len else np.zeros(n)
        delta = r[:, t] + gamma * next_val * nxt - v[:, t]
        a = delta + gamma * lam * next_adv * nxt
        adv[:, t] = a * m[:, t]
        next_adv, next_val = adv[:, t], v[:, t] * m[:, t]
    return adv, (adv + v) * m


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """TRL's ``masked_whiten`` (numpy): ``(x - mean) / sqrt(var + eps)`` over the mask, with the
    unbiased variance (times ``n / (n - 1)``); ``shift_mean=False`` adds the mean back. 0 outside
    the mask."""
    x = np.asarray(x, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)
    count = m.sum()
    mean = (x * m).sum() / max(count, 1.0)
    var = (((x - mean) ** 2) * m).sum() / max(count, 1.0)
    if count > 1:
        var *= count / (count - 1)
    out = (x - mean) / np.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def ppo_loss(logps, values, mask, old_logps, old_values, advantages, returns, *, clip_epsilon: float = 0.2,
             value_clip_epsilon: float = 0.2, vf_coef: float = 0.1):
    """Clipped policy loss + ``vf_coef`` x clipped value loss, token means over the mask.

    Returns ``(loss, metrics)``: ``policy_loss``, ``value_loss``, ``clip_ratio`` (share of
    tokens where the clipped policy term is active), ``value_clip_ratio`` and ``approx_kl``
    (``0.5 (logp - old)^2``, between the sampling and the current policy)."""
    ratio = mx.exp(logps - old_logps)
    pg1 = -advantages * ratio
    pg2 = -advantages * mx.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
    policy_loss = masked_mean(mx.maximum(pg1, pg2), mask)
    v_clipped = old_values + mx.clip(values - old_values, -value_clip_epsilon, value_clip_epsilon)
    vf1 = (values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(mx.maximum(vf1, vf2), mask)
    loss = policy_loss + vf_coef * value_loss
    metrics = {"policy_loss": policy_loss, "value_loss": value_loss,
               "clip_ratio": masked_mean((pg2 > pg1).astype(mx.float32), mask),
               "value_clip_ratio": masked_mean((vf2 > vf1).astype(mx.float32), mask),
               "approx_kl": 0.5 * masked_mean((logps - old_logps) ** 2, mask)}
    return loss, metrics


# ---------------------------------------------------------------------------------- model
def _hidden_and_head(policy):
    """``(hidden_fn, head_fn)`` with ``head_fn(hidden_fn(x)) == policy(x)``, or None.

    mlx-lm causal LMs keep their transformer in ``policy.model`` (returning final, normed
    hidden states) and project with ``lm_head`` or the tied embedding; the pair is verified
    numerically on a short input before it is trusted."""
    inner = policy.get("model") if isinstance(policy, dict) else None
    if not isinstance(inner, nn.Module):
        return None
    if isinstance(policy.get("lm_head"), nn.Module):
        head = lambda h: policy["lm_head"](h)  # noqa: E731
    elif hasattr(inner, "embed_tokens") and hasattr(inner.embed_tokens, "as_linear"):
        head = lambda h: inner.embed_tokens.as_linear(h)  # noqa: E731
    else:
        head = None
    hidden = lambda x: inner(x)  # noqa: E731
    return hidden, head


class PolicyWithValueHead(nn.Module):
    """The policy's own modules (same objects, same parameter names) plus a head on its final
    hidden states (``value_head``; a subclass names its own with ``head_name``).

    Used as the Loop's model by PPO: its trainable parameters are the policy's (all weights,
    or the LoRA adapters) plus the value head's, under the policy's own key names, so the
    checkpoint's weights load into the bare policy with ``strict=False``. The default head is a
    zero-initialised ``nn.Linear(hidden, 1)``."""

    head_name = "value_head"

    def __init__(self, policy: nn.Module, value_head: nn.Module | None = None, seed: int = 0):
        super().__init__()
        object.__setattr__(self, "_policy", policy)
        h = self.adopt_policy_modules()
        if value_head is None:  # zero-initialised; built from `seed`, leaving MLX's global RNG alone
            with seeded_rng(seed):
                value_head = nn.Linear(h.shape[-1], 1)
            value_head.weight = mx.zeros_like(value_head.weight)
            value_head.bias = mx.zeros_like(value_head.bias)
        self[self.head_name] = value_head

    def adopt_policy_modules(self) -> mx.array:
        """Take the policy's top-level modules (again: after ``apply_precision`` replaced a 4-bit
        ``lm_head`` by a plain one, the wrapper must train the new one). Returns probe hidden states."""
        policy, what = self._policy, type(self).__name__
        for k, v in policy.items():
            if isinstance(v, mx.array):
                raise ValueError(f"{what} cannot wrap a model with a top-level parameter array ({k!r})")
            if k == self.head_name:
                raise ValueError(f"the model already has a {self.head_name!r} entry")
            self[k] = v
        pair = _hidden_and_head(policy)
        if pair is None:
            raise ValueError(f"{what} needs the final hidden states of the model ({type(policy).__name__} has no "
                             "'.model' transformer returning them)")
        hidden, head = pair
        probe = mx.array([[1, 2, 3, 4]], dtype=mx.int32)
        with eval_mode(policy):
            h = hidden(probe)
            fused = head is not None and mx.allclose(head(h).astype(mx.float32),
                                                     policy(probe).astype(mx.float32), atol=1e-4).item()
        object.__setattr__(self, "_hidden", hidden)
        object.__setattr__(self, "_head", head if fused else None)
        return h

    @property
    def policy(self) -> nn.Module:
        return self._policy

    def hidden_states(self, inputs):
        """The wrapped model's final (normed) hidden states, (..., T, H)."""
        return self._hidden(inputs)

    def __call__(self, inputs):
        return self._policy(inputs)

    def logits_and_values(self, inputs):
        """One forward pass when the policy allows it (else two): logits and per-position values."""
        h = self._hidden(inputs)
        logits = self._head(h) if self._head is not None else self._policy(inputs)
        values = self[self.head_name](h.astype(mx.float32))[..., 0]
        return logits, values


def load_with_head(path, wrapped: PolicyWithValueHead) -> None:
    """Load a checkpoint into ``wrapped`` (model + head) or, when it holds no head weights (e.g. from
    SFT), into the bare model; the names and shapes are checked first."""
    weights, _ = ckpt.read_weights(path)
    prefix = f"{wrapped.head_name}."
    full = dict(tree_flatten(wrapped.trainable_parameters()))
    with_head = any(k.startswith(prefix) for k in weights)
    target = wrapped if with_head else wrapped.policy
    ckpt.check_compatible(path, weights, full if with_head else {k: v for k, v in full.items()
                                                                 if not k.startswith(prefix)})
    target.load_weights([(k, v.astype(full[k].dtype)) for k, v in weights.items()], strict=False)
    mx.eval(target.parameters())


# ---------------------------------------------------------------------------------- trainer
class PPOTrainer(OnlineRLTrainer):
    """``PPOTrainer(model, tokenizer, PPOConfig(), reward_fn=fn).train(prompts)``.

    ``reward_model=`` (a trained :class:`~lazarus.training.RewardModel` or its folder) scores
    completions beside, or instead of, the reward functions (see :class:`OnlineRLTrainer`).
    ``value_head`` (an ``nn.Module`` mapping hidden states (..., H) to (..., 1)) may be
    given; by default a zero-initialised linear head is created. ``trainer.value_model``
    is the policy + head module the Loop trains.

    Logged: ``loss``, ``policy_loss``, ``value_loss``, ``reward`` (mean score), ``reward_std``,
    ``rewards/<name>``, ``kl`` (mean per-sequence sum of ``logp - ref_logp``, beta > 0),
    ``non_score_reward``, ``clip_ratio``, ``value_clip_ratio``, ``approx_kl``,
    ``completions/*`` and ``timing/rollout_share``."""

    config_class = PPOConfig

    def __init__(self, model, tokenizer, config: PPOConfig | None = None, reward_fn=None, *, reward_funcs=None,
                 reward_weights=None, reward_model=None, reference_model=None, value_head: nn.Module | None = None,
                 callbacks=None, optimizer=None):
        super().__init__(model, tokenizer, config, reward_fn, reward_funcs=reward_funcs,
                         reward_weights=reward_weights, reward_model=reward_model, reference_model=reference_model,
                         callbacks=callbacks, optimizer=optimizer)
        self.value_model = PolicyWithValueHead(model, value_head, seed=self.config.seed)

    def train_module(self):
        return self.value_model

    def apply_precision(self):
        precision = super().apply_precision()
        self.value_model.adopt_policy_modules()  # a dequantized lm_head is a new module
        return precision

    def steps_per_rollout(self) -> int:
        return self.config.ppo_epochs * self.config.num_minibatches

    # ---- rollout ------------------------------------------------------------------------
    def _logps_and_values(self, inputs, targets, chunk):
        t = self.config.temperature
        vm = self.value_model

        def fn(i, g):
            logits, values = vm.logits_and_values(i)
            return logps_from_logits(logits, g, t), values

        with eval_mode(self.model):
            return chunked(fn, inputs.shape[0], chunk, inputs, targets)

    def rollout(self, state, prompt_batch) -> Rollout:
        t0 = time.perf_counter()
        c = self.config
        comps, prompts, columns = self.sample(prompt_batch, c.group_size)
        total, per = self.rewards(prompts, comps.texts, columns)
        scores = total.copy()
        if c.missing_eos_penalty is not None:
            scores[~np.asarray(comps.finished)] -= c.missing_eos_penalty
        inputs, targets, mask = pack_sequences(comps.prompt_ids, comps.completion_ids, self.pad_id)
        n = len(comps)
        chunk = -(-n // c.num_minibatches)
        x, y = mx.array(inputs), mx.array(targets)
        old_logps, old_values = self._logps_and_values(x, y, chunk)
        lp = np.array(old_logps, dtype=np.float64)
        token_rewards = np.zeros_like(lp)
        metrics = {}
        if self.needs_reference():
            ref = np.array(self.reference_logps(x, y, chunk), dtype=np.float64)
            kl = (lp - ref) * mask
            token_rewards -= c.beta * kl
            metrics["kl"] = float(kl.sum(axis=1).mean())
            metrics["non_score_reward"] = float((-c.beta * kl).sum(axis=1).mean())
        last = np.array([len(p) - 1 + len(cid) - 1 for p, cid in zip(comps.prompt_ids, comps.completion_ids)])
        token_rewards[np.arange(n), last] += scores
        values = np.array(old_values, dtype=np.float64) * mask
        adv, returns = gae(token_rewards, values, mask, c.gamma, c.gae_lambda)
        if c.whiten_advantages:
            adv = whiten(adv, mask)
        arrays = {"inputs": x, "targets": y, "mask": mx.array(mask), "old_logps": old_logps,
                  "old_values": mx.array(values.astype(np.float32)),
                  "advantages": mx.array(adv.astype(np.float32)), "returns": mx.array(returns.astype(np.float32))}
        metrics.update({"reward": float(total.mean()), "reward_std": float(total.std()),
                        **self._per_reward_means(per), **comps.metrics()})
        batches = []
        for idx, part in self.minibatches(arrays, n, c.ppo_epochs, state.step, salt=11):
            # each rank's token mean counts equally, as TRL's per-process mean averaged over processes
            batches.append({**part, "loss_weight": mx.array(1.0), "num_tokens": int(mask[idx].sum())})
        return self.rollout_result(t0, batches, metrics, n)

    # ---- objective ------------------------------------------------------------------------
    def compute_loss(self, model, batch):
        c = self.config
        logits, values = model.logits_and_values(batch["inputs"])
        logps = logps_from_logits(logits, batch["targets"], c.temperature)
        loss, metrics = ppo_loss(logps, values, batch["mask"], batch["old_logps"], batch["old_values"],
                                 batch["advantages"], batch["returns"], clip_epsilon=c.clip_epsilon,
                                 value_clip_epsilon=c.value_clip_epsilon, vf_coef=c.vf_coef)
        return loss, metrics

    # ---- checkpoints ------------------------------------------------------------------------
    def load_checkpoint(self, path) -> None:
        """Load a PPO checkpoint (policy + value head) or a bare policy one (e.g. from SFT)."""
        load_with_head(path, self.value_model)
