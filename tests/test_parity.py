"""Numerical parity with TRL's published formulas (DPO, GRPO, SFT) and CleanRL's PPO.

Every reference below is an independent numpy (float64) transcription of the formula as TRL
writes it in ``trl/trainer/dpo_trainer.py`` / ``grpo_trainer.py`` / ``utils.py`` and CleanRL in
``ppo.py``: no Lazarus code is used to compute an expected value. Inputs are random with ragged
masks, an all-masked row and rows where policy == reference. Errors are measured as
``max|got - want| / max|want|`` and must stay below 1e-5 (values and gradients).
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from lazarus.training import (DPOConfig, DPOTrainer, DPOTrainerConfig, SFTTrainer, dpo_loss, gae,
                              group_advantages, grpo_loss, ppo_loss, whiten)

TOL = 1e-5
ERRORS: dict[str, float] = {}  # the largest relative error of each comparison (printed with -s)


def check(name, got, want, tol=TOL):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30)) if want.size else 0.0
    ERRORS[name] = max(err, ERRORS.get(name, 0.0))
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for k, v in sorted(ERRORS.items()):
        print(f"parity {k:<40} max rel err {v:.2e}")


# ---------------------------------------------------------------- shared numpy pieces
def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_token_logps(logits, targets):
    return np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ragged_mask(rng, n, t, empty_rows=(1,)):
    """Completion masks of random lengths starting at random offsets; ``empty_rows`` are all 0."""
    mask = np.zeros((n, t))
    for i in range(n):
        if i in empty_rows:
            continue
        start = rng.integers(0, t // 2)
        mask[i, start: rng.integers(start + 1, t + 1)] = 1.0
    return mask


class FixedLogits(nn.Module):
    """A stand-in model whose output is its one parameter, so gradients can be taken w.r.t. logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = mx.array(logits.astype(np.float32))

    def __call__(self, inputs):
        return self.logits


def logits_grad(logits, targets, dloss_dlogp):
    """d loss / d logits from d loss / d (per-token log-prob): g * (onehot(target) - softmax)."""
    soft = np.exp(np_log_softmax(logits))
    onehot = np.zeros_like(logits)
    np.put_along_axis(onehot, targets[..., None], 1.0, -1)
    return dloss_dlogp[..., None] * (onehot - soft)


# ---------------------------------------------------------------- SFT
def test_sft_token_mean_cross_entropy():
    """TRL SFT (transformers' causal LM loss with num_items_in_batch): summed CE / target tokens."""
    rng = np.random.default_rng(0)
    n, t, v = 5, 9, 17
    logits = rng.normal(0, 2, (n, t, v))
    targets = rng.integers(0, v, (n, t))
    mask = ragged_mask(rng, n, t)
    want = -(np_token_logps(logits, targets) * mask).sum() / mask.sum()
    model = FixedLogits(logits)
    batch = {"inputs": mx.zeros((n, t), mx.int32), "targets": mx.array(targets.astype(np.int32)),
             "mask": mx.array(mask.astype(np.float32))}
    trainer = SFTTrainer(model, None)
    (loss, _), grads = nn.value_and_grad(model, trainer.compute_loss)(model, batch)
    check("sft/loss", loss.item(), want)
    check("sft/grad", np.array(grads["logits"]), logits_grad(logits, targets, -mask / mask.sum()))


# ---------------------------------------------------------------- DPO
def trl_dpo(logits, targets, mask, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    """TRL DPOTrainer: concatenated_forward sums the response log-probs (for ipo: divides them,
    policy and reference alike, by the response length), then dpo_loss."""
    n = logits.shape[0] // 2
    seq = (np_token_logps(logits, targets) * mask).sum(-1)
    ref = np.concatenate([ref_chosen, ref_rejected])
    if loss_type == "ipo":
        length = np.maximum(mask.sum(-1), 1.0)  # TRL divides by the raw count (0/0 for an empty row)
        seq, ref = seq / length, ref / length
    pc, pr, rc, rr = seq[:n], seq[n:], ref[:n], ref[n:]
    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -np_logsigmoid(beta * h) * (1 - label_smoothing) - np_logsigmoid(-beta * h) * label_smoothing
        dh = (-(1 - label_smoothing) * beta * np_sigmoid(-beta * h) + label_smoothing * beta * np_sigmoid(beta * h))
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * h)
        dh = np.where(1 - beta * h > 0, -beta, 0.0)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
        dh = 2 * (h - 1 / (2 * beta))
    dseq = np.concatenate([dh, -dh]) / n  # d mean(losses) / d (sequence log-prob)
    if loss_type == "ipo":
        dseq = dseq / length
    grad = logits_grad(logits, targets, dseq[:, None] * mask)
    return losses.mean(), beta * (pc - rc), beta * (pr - rr), pc, grad


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0),
                                                       ("ipo", 0.0)])
def test_dpo_matches_trl(loss_type, label_smoothing):
    rng = np.random.default_rng(1)
    pairs, t, v, beta = 4, 10, 13, 0.3
    logits = rng.normal(0, 1.5, (2 * pairs, t, v))
    targets = rng.integers(0, v, (2 * pairs, t))
    mask = ragged_mask(rng, 2 * pairs, t, empty_rows=(5,))  # one empty rejected response
    seq = (np_token_logps(logits, targets) * mask).sum(-1)
    ref_chosen = seq[:pairs] + rng.normal(0, 2, pairs)
    ref_rejected = seq[pairs:] + rng.normal(0, 2, pairs)
    ref_chosen[0], ref_rejected[0] = seq[0], seq[pairs]  # pair 0: policy == reference
    want_loss, want_cr, want_rr, want_pc, want_grad = trl_dpo(logits, targets, mask, ref_chosen, ref_rejected,
                                                             beta, loss_type, label_smoothing)
    model = FixedLogits(logits)
    cfg = DPOTrainerConfig(dpo=DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing))
    trainer = DPOTrainer(model, None, None, cfg)
    batch = {"inputs": mx.zeros((2 * pairs, t), mx.int32), "targets": mx.array(targets.astype(np.int32)),
             "mask": mx.array(mask.astype(np.float32)), "ref_chosen": mx.array(ref_chosen.astype(np.float32)),
             "ref_rejected": mx.array(ref_rejected.astype(np.float32))}
    (loss, metrics), grads = nn.value_and_grad(model, trainer.compute_loss)(model, batch)
    name = f"dpo/{loss_type}" + ("+smoothing" if label_smoothing else "")
    check(f"{name}/loss", loss.item(), want_loss)
    check(f"{name}/grad", np.array(grads["logits"]), want_grad)
    check(f"{name}/rewards", [metrics["rewards/chosen"].item(), metrics["rewards/rejected"].item(),
                             metrics["rewards/margins"].item()],
          [want_cr.mean(), want_rr.mean(), (want_cr - want_rr).mean()])
    check(f"{name}/logps", metrics["logps/chosen"].item(), want_pc.mean())
    assert metrics["rewards/accuracies"].item() == pytest.approx(np.mean(want_cr > want_rr))


def test_dpo_sigmoid_gradient_wrt_sequence_logps():
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (rng.normal(-15, 4, 16) for _ in range(4))
    rc[:3], rr[:3] = pc[:3], pr[:3]  # policy == reference
    beta, eps = 0.1, 0.1

    def f(a, b):
        losses, _, _ = dpo_loss(a, b, mx.array(rc.astype(np.float32)), mx.array(rr.astype(np.float32)), beta,
                                "sigmoid", eps)
        return losses.mean()

    ga, gb = mx.grad(f, argnums=(0, 1))(mx.array(pc.astype(np.float32)), mx.array(pr.astype(np.float32)))
    h = (pc - pr) - (rc - rr)
    dh = (-(1 - eps) * beta * np_sigmoid(-beta * h) + eps * beta * np_sigmoid(beta * h)) / len(h)
    check("dpo/sigmoid/grad_seq_logps", np.concatenate([np.array(ga), np.array(gb)]), np.concatenate([dh, -dh]))
    # and by central finite differences of the float64 reference
    step = 1e-4
    for i in (0, 5):
        up, down = pc.copy(), pc.copy()
        up[i] += step
        down[i] -= step

        def ref_loss(a):
            hh = (a - pr) - (rc - rr)
            return np.mean(-(1 - eps) * np_logsigmoid(beta * hh) - eps * np_logsigmoid(-beta * hh))

        check("dpo/sigmoid/finite_difference", np.array(ga)[i], (ref_loss(up) - ref_loss(down)) / (2 * step), 1e-4)


def test_ipo_does_not_grow_with_length():
    """Per-token means: repeating every response k times leaves the IPO loss unchanged."""
    losses = []
    for k in (1, 4):
        rng = np.random.default_rng(3)
        logits = np.tile(rng.normal(0, 1, (2, 6, 11)), (1, k, 1))
        targets = np.tile(rng.integers(0, 11, (2, 6)), (1, k))
        model = FixedLogits(logits)
        trainer = DPOTrainer(model, None, None, DPOTrainerConfig(dpo=DPOConfig(loss_type="ipo", beta=0.5)))
        batch = {"inputs": mx.zeros(targets.shape, mx.int32), "targets": mx.array(targets.astype(np.int32)),
                 "mask": mx.ones(targets.shape), "ref_chosen": mx.array([-10.0 * k]),
                 "ref_rejected": mx.array([-30.0 * k])}
        losses.append(trainer.compute_loss(model, batch)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# ---------------------------------------------------------------- GRPO
def trl_group_advantages(rewards, group_size, scale_rewards):
    """TRL: (r - group mean) / (torch.std(group) + 1e-4), torch.std being unbiased; here a NaN
    reward (no function scored it) is left out of its group and gets advantage 0."""
    adv = np.zeros(len(rewards))
    stds = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start: start + group_size]
        scored = [x for x in group if not math.isnan(x)]
        mean = sum(scored) / len(scored) if scored else 0.0
        var = sum((x - mean) ** 2 for x in scored) / (len(scored) - 1) if len(scored) > 1 else 0.0
        std = math.sqrt(var)
        stds.append(std)
        for j, x in enumerate(group):
            if not math.isnan(x):
                adv[start + j] = (x - mean) / (std + 1e-4) if scale_rewards else x - mean
    return adv, np.array(stds)


@pytest.mark.parametrize("scale_rewards", [True, False])
def test_group_advantages_match_trl(scale_rewards):
    rng = np.random.default_rng(5)
    g = 6
    rewards = rng.normal(0, 1, 8 * g)
    rewards[g: 2 * g] = 0.5  # a group with no signal: std 0, advantages 0
    rewards[[2 * g, 3 * g + 1, 3 * g + 4]] = np.nan  # unscored completions
    rewards[4 * g: 5 * g - 1] = np.nan  # a group with one scored completion
    rewards[5 * g: 6 * g] = np.nan  # a group with none
    want_adv, want_std = trl_group_advantages(rewards, g, scale_rewards)
    adv, std = group_advantages(rewards, g, scale_rewards)
    check(f"grpo/advantages(scale={scale_rewards})", adv, want_adv)
    check("grpo/group_std", std, want_std)
    assert np.all(adv[np.isnan(rewards)] == 0)


def trl_grpo(logps, old, ref, mask, adv, beta, eps_low, eps_high, loss_type, max_len, normalizer):
    """TRL GRPOTrainer._compute_loss in numpy, plus its analytic gradient w.r.t. logps."""
    old = logps if old is None else old
    coef_1 = np.exp(logps - old)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv[:, None]
    loss1, loss2 = coef_1 * a, coef_2 * a
    per_token = -np.minimum(loss1, loss2)
    # d(-min)/d logp: the unclipped branch's -r A where it is the min; 0 where the clip binds
    d_per_token = -np.where(loss1 <= loss2, coef_1 * a, 0.0)
    if beta:
        kl = np.exp(ref - logps) - (ref - logps) - 1
        per_token = per_token + beta * kl
        d_per_token = d_per_token + beta * (1 - np.exp(ref - logps))
    rows = mask.shape[0]
    if loss_type == "grpo":
        weight = mask / np.maximum(mask.sum(-1, keepdims=True), 1.0) / rows
    elif loss_type == "dr_grpo":
        weight = mask / (rows * max_len)
    else:  # dapo: num_items_in_batch / num_processes (here one process, or the given normaliser)
        weight = mask / (max(mask.sum(), 1.0) if normalizer is None else normalizer)
    loss = (per_token * weight).sum()
    low = (coef_1 < 1 - eps_low) & (a < 0)
    high = (coef_1 > 1 + eps_high) & (a > 0)
    clip_ratio = ((low | high) * mask).sum() / mask.sum()
    mean_kl = (kl * mask).sum() / mask.sum() if beta else None
    return loss, d_per_token * weight, clip_ratio, mean_kl


GRPO_CASES = [(lt, beta, high, with_old, norm) for lt in ("grpo", "dapo", "dr_grpo") for beta in (0.0, 0.04)
              for high in (None, 0.28) for with_old in (False, True) for norm in ((None, 37.5) if lt == "dapo" else
                                                                                     (None,))]


@pytest.mark.parametrize("loss_type,beta,eps_high,with_old,normalizer", GRPO_CASES)
def test_grpo_loss_matches_trl(loss_type, beta, eps_high, with_old, normalizer):
    rng = np.random.default_rng(6)
    n, t, max_len = 8, 12, 12
    mask = ragged_mask(rng, n, t, empty_rows=(3,))
    logps = rng.normal(-2.0, 1.0, (n, t))
    old = logps + rng.normal(0, 0.3, (n, t))  # ratios well outside [0.8, 1.28] on some tokens
    old[0] = logps[0]  # a row sampled by the current weights
    ref = logps + rng.normal(0, 0.5, (n, t))
    ref[1] = logps[1]  # policy == reference: k3 = 0
    adv = rng.normal(0, 1, n)
    adv[2] = 0.0
    want_loss, want_grad, want_clip, want_kl = trl_grpo(logps, old if with_old else None, ref, mask, adv, beta, 0.2,
                                                        0.2 if eps_high is None else eps_high, loss_type, max_len,
                                                        normalizer)
    f32 = lambda x: mx.array(np.asarray(x, dtype=np.float32))  # noqa: E731

    def f(lp):
        return grpo_loss(lp, f32(mask), f32(adv), f32(old) if with_old else None, f32(ref), beta=beta,
                         clip_epsilon=0.2, clip_epsilon_high=eps_high, loss_type=loss_type,
                         max_completion_length=max_len,
                         normalizer=None if normalizer is None else mx.array(normalizer))

    loss, metrics = f(f32(logps))
    grad = mx.grad(lambda lp: f(lp)[0])(f32(logps))
    name = f"grpo/{loss_type}"
    check(f"{name}/loss", loss.item(), want_loss)
    check(f"{name}/grad", np.array(grad), want_grad)
    if with_old:
        assert want_clip > 0  # the clip engages on these inputs
        check("grpo/clip_ratio", metrics["clip_ratio"].item(), want_clip)
    else:
        assert metrics["clip_ratio"].item() == want_clip == 0.0
    if beta:
        check("grpo/kl", metrics["kl"].item(), want_kl)


def test_grpo_finite_difference_gradient():
    """The analytic reference above agrees with finite differences of the float64 TRL loss."""
    rng = np.random.default_rng(7)
    n, t = 4, 6
    mask = ragged_mask(rng, n, t, empty_rows=())
    logps, old, ref = rng.normal(-2, 1, (n, t)), rng.normal(-2, 1, (n, t)), rng.normal(-2, 1, (n, t))
    adv = rng.normal(0, 1, n)
    args = (old, ref, mask, adv, 0.04, 0.2, 0.28, "grpo", t, None)
    grad = np.array(mx.grad(lambda lp: grpo_loss(lp, *(mx.array(a.astype(np.float32)) for a in (mask, adv, old, ref)),
                                                 beta=0.04, clip_epsilon=0.2, clip_epsilon_high=0.28,
                                                 loss_type="grpo")[0])(mx.array(logps.astype(np.float32))))
    step = 1e-6
    for i, j in zip(*np.nonzero(mask)):
        up, down = logps.copy(), logps.copy()
        up[i, j] += step
        down[i, j] -= step
        fd = (trl_grpo(up, *args)[0] - trl_grpo(down, *args)[0]) / (2 * step)
        check("grpo/finite_difference", grad[i, j], fd, 1e-4)


# ---------------------------------------------------------------- PPO (CleanRL / TRL)
def cleanrl_gae(rewards, values, mask, gamma, lam):
    """CleanRL ppo.py's backward GAE over each row's completion, the last token terminal."""
    adv = np.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        idx = np.nonzero(mask[i])[0]
        lastgaelam = 0.0
        for k in range(len(idx) - 1, -1, -1):
            t = idx[k]
            nextnonterminal = 0.0 if k == len(idx) - 1 else 1.0
            nextvalue = values[i, idx[k + 1]] if nextnonterminal else 0.0
            delta = rewards[i, t] + gamma * nextvalue * nextnonterminal - values[i, t]
            lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
            adv[i, t] = lastgaelam
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_cleanrl(gamma, lam):
    rng = np.random.default_rng(8)
    mask = ragged_mask(rng, 6, 11)
    rewards, values = rng.normal(0, 1, (6, 11)) * mask, rng.normal(0, 1, (6, 11)) * mask
    want_adv, want_ret = cleanrl_gae(rewards, values, mask, gamma, lam)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    check("ppo/gae/advantages", adv, want_adv)
    check("ppo/gae/returns", ret, want_ret)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_trl_masked_whiten(shift_mean):
    """TRL utils.masked_whiten: masked mean, masked var x n/(n-1), (x - mean) * rsqrt(var + 1e-8)."""
    rng = np.random.default_rng(9)
    mask = ragged_mask(rng, 5, 9)
    x = rng.normal(3, 2, (5, 9))
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / n * (n / (n - 1))
    want = (x - mean) / np.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    check(f"ppo/whiten(shift_mean={shift_mean})", whiten(x, mask, shift_mean=shift_mean), want * mask)


def test_ppo_loss_matches_cleanrl():
    rng = np.random.default_rng(10)
    n, t, clip, vclip, vf_coef = 6, 10, 0.2, 0.2, 0.1
    mask = ragged_mask(rng, n, t)
    logps, old = rng.normal(-2, 1, (n, t)), rng.normal(-2, 1, (n, t))
    old[0] = logps[0]
    values, old_values, returns = (rng.normal(0, 1, (n, t)) for _ in range(3))
    adv = rng.normal(0, 1, (n, t))
    ratio = np.exp(logps - old)
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip))
    v_clipped = old_values + np.clip(values - old_values, -vclip, vclip)
    vf = np.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    mmean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    want_pg, want_vf = mmean(pg), 0.5 * mmean(vf)
    f32 = lambda x: mx.array(x.astype(np.float32))  # noqa: E731
    loss, m = ppo_loss(f32(logps), f32(values), f32(mask), f32(old), f32(old_values), f32(adv), f32(returns),
                       clip_epsilon=clip, value_clip_epsilon=vclip, vf_coef=vf_coef)
    check("ppo/policy_loss", m["policy_loss"].item(), want_pg)
    check("ppo/value_loss", m["value_loss"].item(), want_vf)
    check("ppo/loss", loss.item(), want_pg + vf_coef * want_vf)
    check("ppo/clipfrac", m["clip_ratio"].item(),
          mmean((-adv * np.clip(ratio, 1 - clip, 1 + clip) > -adv * ratio).astype(float)))


def test_dpo_rpo_alpha_adds_the_chosen_nll_as_trl():
    """TRL's rpo_alpha: loss = mean DPO loss + alpha * NLL of the chosen tokens (mean over all of them)."""
    rng = np.random.default_rng(5)
    pairs, t, v, beta, alpha = 3, 8, 11, 0.2, 0.7
    logits = rng.normal(0, 1.5, (2 * pairs, t, v))
    targets = rng.integers(0, v, (2 * pairs, t))
    mask = ragged_mask(rng, 2 * pairs, t)
    seq = (np_token_logps(logits, targets) * mask).sum(-1)
    ref_c, ref_r = seq[:pairs] + rng.normal(0, 1, pairs), seq[pairs:] + rng.normal(0, 1, pairs)
    dpo_loss_value, *_, dpo_grad = trl_dpo(logits, targets, mask, ref_c, ref_r, beta, "sigmoid", 0.0)
    chosen = np.zeros_like(mask)
    chosen[:pairs] = mask[:pairs]
    nll = -(np_token_logps(logits, targets) * chosen).sum() / chosen.sum()
    want_grad = dpo_grad + logits_grad(logits, targets, -alpha * chosen / chosen.sum())
    model = FixedLogits(logits)
    trainer = DPOTrainer(model, None, None, DPOTrainerConfig(dpo=DPOConfig(beta=beta, rpo_alpha=alpha)))
    batch = {"inputs": mx.zeros((2 * pairs, t), mx.int32), "targets": mx.array(targets.astype(np.int32)),
             "mask": mx.array(mask.astype(np.float32)), "ref_chosen": mx.array(ref_c.astype(np.float32)),
             "ref_rejected": mx.array(ref_r.astype(np.float32))}
    (loss, metrics), grads = nn.value_and_grad(model, trainer.compute_loss)(model, batch)
    check("dpo/rpo/loss", loss.item(), dpo_loss_value + alpha * nll)
    check("dpo/rpo/nll", metrics["nll_loss"].item(), nll)
    check("dpo/rpo/grad", np.array(grads["logits"]), want_grad)
