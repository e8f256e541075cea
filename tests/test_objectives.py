"""ORPO, SimPO and KTO: parity with TRL's formulas, learning, exact resume, LoRA and full, the CLI.

The references below are independent numpy (float64) transcriptions of TRL's ``ORPOTrainer``
(``odds_ratio_loss`` + the chosen cross-entropy), ``CPOTrainer`` (``loss_type="simpo"``) and
``KTOTrainer`` (``loss_type="kto"``), with gradients derived by hand (no autodiff), checked
against finite differences of the float64 losses. Errors: ``max|got - want| / max|want|`` < 1e-5.
"""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pydantic
import pytest
from mlx.utils import tree_flatten

from conftest import stop_at, write_jsonl
from lazarus.cli import main
from lazarus.data import PreferenceDataset, UnpairedDataset
from lazarus.models import load_model
from lazarus.training import (KTOConfig, KTOTrainer, ORPOConfig, ORPOTrainer, SimPOConfig, SimPOTrainer, kto_loss,
                              orpo_loss)
from lazarus.training.dpo import sequence_logps
from lazarus.training.kto import KTOBatches, finish_metrics, pair_within_batches
from lazarus.training.orpo import log1mexp
from test_parity import (FixedLogits, check, logits_grad, np_logsigmoid, np_sigmoid, np_token_logps,
                         ragged_mask)

EXAMPLES = Path(__file__).resolve().parent.parent / "lazarus" / "data" / "examples"
f32 = lambda x: mx.array(np.asarray(x, dtype=np.float32))  # noqa: E731


def logit_batch(rng, rows, t=9, v=13, empty_rows=()):
    logits = rng.normal(0, 1.5, (rows, t, v))
    targets = rng.integers(0, v, (rows, t))
    mask = ragged_mask(rng, rows, t, empty_rows=empty_rows)
    batch = {"inputs": mx.array(np.arange(rows, dtype=np.int32)[:, None].repeat(t, 1)),  # row ids (RowLogits)
             "targets": mx.array(targets.astype(np.int32)), "mask": f32(mask)}
    return logits, targets, mask, batch


class RowLogits(FixedLogits):
    """Logits chosen by row id (``inputs[:, 0]``): KTO runs its example rows and KL rows apart."""

    def __call__(self, inputs):
        return self.logits[inputs[:, 0]]


# ---------------------------------------------------------------- ORPO
def trl_orpo(logits, targets, mask, beta):
    """TRL ORPOTrainer: per-token mean log-probs of the responses, log odds, ``loss = NLL - beta mean
    logsig`` where NLL is the cross-entropy of the whole chosen sequences (labels = input ids where
    the attention mask is 1: prompt included, padding not); plus d loss / d logits by hand."""
    n = logits.shape[0] // 2
    tok = np_token_logps(logits, targets)
    lens = mask.sum(-1)
    avg = (tok * mask).sum(-1) / lens
    c, r = avg[:n], avg[n:]
    seq = np.zeros_like(mask[:n])  # the chosen sequences' targets: up to the response's end
    for b in range(n):
        seq[b, : np.nonzero(mask[b])[0].max() + 1] = 1.0
    nll = -(tok[:n] * seq).sum() / seq.sum()
    log_odds = (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))
    loss = nll - beta * np_logsigmoid(log_odds).mean()
    s = np_sigmoid(-log_odds)  # d logsigmoid(x) / dx; d log_odds / dc = 1 / (1 - e^c)
    d_avg = np.concatenate([-beta * s / (1 - np.exp(c)), beta * s / (1 - np.exp(r))]) / n
    d_tok = d_avg[:, None] * mask / lens[:, None]
    d_tok[:n] -= seq / seq.sum()
    metrics = {"rewards/chosen": beta * c.mean(), "rewards/rejected": beta * r.mean(),
               "rewards/margins": beta * (c - r).mean(), "rewards/accuracies": np.mean(c > r),
               "logps/chosen": c.mean(), "logps/rejected": r.mean(), "nll_loss": nll,
               "log_odds_ratio": np_logsigmoid(log_odds).mean(), "log_odds_chosen": log_odds.mean()}
    return loss, logits_grad(logits, targets, d_tok), metrics


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
    rng = np.random.default_rng(11)
    logits, targets, mask, batch = logit_batch(rng, 8)
    want_loss, want_grad, want = trl_orpo(logits, targets, mask, beta)
    model = FixedLogits(logits)
    trainer = ORPOTrainer(model, None, ORPOConfig(beta=beta))
    (loss, metrics), grads = nn.value_and_grad(model, trainer.compute_loss)(model, batch)
    check(f"orpo({beta})/loss", loss.item(), want_loss)
    check(f"orpo({beta})/grad", np.array(grads["logits"]), want_grad)
    for k, v in want.items():
        check(f"orpo({beta})/{k}", metrics[k].item(), v)


def test_orpo_gradient_finite_differences_and_stability_near_zero():
    rng = np.random.default_rng(12)
    c, r = rng.uniform(-4, -0.01, 6), rng.uniform(-4, -0.01, 6)
    c[0], r[1] = -1e-5, -2e-6  # near-certain responses: 1 - e^x loses every digit if done naively
    c, r = c.astype(np.float32).astype(np.float64), r.astype(np.float32).astype(np.float64)
    beta = 0.1

    def ref(cc, rr):
        lo = (cc - rr) - (np.log(-np.expm1(cc)) - np.log(-np.expm1(rr)))
        return -beta * np_logsigmoid(lo), lo

    losses, _, _, log_odds = orpo_loss(f32(c), f32(r), beta)
    want_losses, want_lo = ref(c, r)
    check("orpo/losses(near 0)", np.array(losses), want_losses)
    check("orpo/log_odds(near 0)", np.array(log_odds), want_lo)
    gc, gr = mx.grad(lambda a, b: orpo_loss(a, b, beta)[0].mean(), argnums=(0, 1))(f32(c), f32(r))
    fd = np.zeros(2 * len(c))
    for i in range(2 * len(c)):
        x = np.concatenate([c, r])
        h = 1e-4 * abs(x[i])  # central differences, O(h^2); x stays < 0
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        fd[i] = (ref(up[:6], up[6:])[0].mean() - ref(down[:6], down[6:])[0].mean()) / (2 * h)
    check("orpo/finite_difference", np.concatenate([np.array(gc), np.array(gr)]), fd, 1e-4)


def test_log1mexp_is_accurate_and_finite_everywhere():
    x = -np.concatenate([np.logspace(-7, 1.7, 200), [math.log(2)]]).astype(np.float32)
    got = np.array(log1mexp(f32(x)))
    check("log1mexp", got, np.log(-np.expm1(x.astype(np.float64))))
    grad = np.array(mx.grad(lambda v: log1mexp(v).sum())(f32([-1e-12, 0.0, -1e-7, -50.0])))
    assert np.all(np.isfinite(grad)) and grad[0] == grad[1] == 0.0  # clamped above LOGP_CEILING


# ---------------------------------------------------------------- SimPO (TRL CPOTrainer, loss_type="simpo")
def trl_simpo(logits, targets, mask, beta, gamma, smoothing, cpo_alpha):
    n = logits.shape[0] // 2
    tok = np_token_logps(logits, targets)
    lens = mask.sum(-1)
    avg = (tok * mask).sum(-1) / lens
    c, r = avg[:n], avg[n:]
    h = (c - r) - gamma / beta
    losses = -(1 - smoothing) * np_logsigmoid(beta * h) - smoothing * np_logsigmoid(-beta * h)
    nll = -(tok[:n] * mask[:n]).sum() / mask[:n].sum()
    dh = (-(1 - smoothing) * beta * np_sigmoid(-beta * h) + smoothing * beta * np_sigmoid(beta * h)) / n
    d_tok = np.concatenate([dh, -dh])[:, None] * mask / lens[:, None]
    d_tok[:n] -= cpo_alpha * mask[:n] / mask[:n].sum()
    metrics = {"rewards/chosen": beta * c.mean(), "rewards/rejected": beta * r.mean(),
               "rewards/margins": beta * (c - r).mean(), "rewards/accuracies": np.mean(c > r),
               "logps/chosen": c.mean(), "logps/rejected": r.mean(), "nll_loss": nll}
    return losses.mean() + cpo_alpha * nll, logits_grad(logits, targets, d_tok), metrics


@pytest.mark.parametrize("smoothing,cpo_alpha", [(0.0, 0.0), (0.1, 0.0), (0.0, 1.0)])
def test_simpo_matches_trl_cpo(smoothing, cpo_alpha):
    rng = np.random.default_rng(13)
    logits, targets, mask, batch = logit_batch(rng, 10)
    beta, gamma = 2.0, 0.5
    want_loss, want_grad, want = trl_simpo(logits, targets, mask, beta, gamma, smoothing, cpo_alpha)
    model = FixedLogits(logits)
    cfg = SimPOConfig(beta=beta, gamma=gamma, label_smoothing=smoothing, cpo_alpha=cpo_alpha)
    (loss, metrics), grads = nn.value_and_grad(model, SimPOTrainer(model, None, cfg).compute_loss)(model, batch)
    name = f"simpo(e={smoothing},alpha={cpo_alpha})"
    check(f"{name}/loss", loss.item(), want_loss)
    check(f"{name}/grad", np.array(grads["logits"]), want_grad)
    for k, v in want.items():
        check(f"{name}/{k}", metrics[k].item(), v)


# ---------------------------------------------------------------- KTO
def trl_kto(logits, targets, mask, labels, ref, ref_kl, beta, wd, wu):
    """TRL KTOTrainer (loss_type="kto"): summed completion log-probs, the KL rows' mean log-ratio
    clamped at 0 and detached, chosen/rejected losses concatenated and averaged; the metrics of
    one micro-batch; d loss / d logits by hand (the KL rows get none)."""
    n = len(labels)
    seq = (np_token_logps(logits, targets) * mask).sum(-1)
    pol, pol_kl = seq[:n], seq[n:]
    kl = max((pol_kl - ref_kl).mean(), 0.0)
    ci, ri = np.nonzero(labels)[0], np.nonzero(~labels)[0]
    cr, rr = pol[ci] - ref[ci], pol[ri] - ref[ri]
    sc, sr = np_sigmoid(beta * (cr - kl)), np_sigmoid(beta * (kl - rr))
    loss = np.concatenate([wd * (1 - sc), wu * (1 - sr)]).mean()
    d_seq = np.zeros(2 * n)
    d_seq[ci] = -wd * beta * sc * (1 - sc) / n
    d_seq[ri] = wu * beta * sr * (1 - sr) / n
    metrics = {"kl": kl}
    if len(ci):
        metrics.update({"rewards/chosen": beta * cr.mean(), "logps/chosen": pol[ci].mean()})
    if len(ri):
        metrics.update({"rewards/rejected": beta * rr.mean(), "logps/rejected": pol[ri].mean()})
    if len(ci) and len(ri):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, logits_grad(logits, targets, d_seq[:, None] * mask), metrics


KTO_CASES = {"mixed": ([1, 0, 1, 1, 0, 0], 0.0, 1.0, 1.0), "kl clamped to 0": ([1, 0, 0, 1, 1, 0], 30.0, 1.0, 1.0),
             "weighted": ([0, 1, 1, 0, 0, 0], 0.0, 1.33, 0.7), "only desirable": ([1] * 6, 0.0, 1.0, 1.0),
             "only undesirable": ([0] * 6, 0.0, 1.0, 2.0)}


@pytest.mark.parametrize("case", list(KTO_CASES))
def test_kto_matches_trl(case):
    labels, kl_shift, wd, wu = KTO_CASES[case]
    labels = np.array(labels, dtype=bool)
    n, beta = len(labels), 0.3
    rng = np.random.default_rng(14)
    logits, targets, mask, batch = logit_batch(rng, 2 * n, empty_rows=(8,))  # an empty KL row
    seq = (np_token_logps(logits, targets) * mask).sum(-1)
    ref = seq[:n] + rng.normal(0, 3, n)
    ref[0] = seq[0]  # policy == reference
    ref_kl = seq[n:] + rng.normal(-1, 1, n) + kl_shift  # kl_shift > 0: the mean log-ratio < 0, clamped
    want_loss, want_grad, want = trl_kto(logits, targets, mask, labels, ref, ref_kl, beta, wd, wu)
    model = RowLogits(logits)
    trainer = KTOTrainer(model, None, None, KTOConfig(beta=beta, desirable_weight=wd, undesirable_weight=wu))
    batch.update(label=f32(labels), ref_logps=f32(ref), ref_kl_logps=f32(ref_kl))
    (loss, metrics), grads = nn.value_and_grad(model, trainer.compute_loss)(model, batch)
    check(f"kto/{case}/loss", loss.item(), want_loss)
    check(f"kto/{case}/grad", np.array(grads["logits"]), want_grad)
    got = finish_metrics({k: v.item() for k, v in metrics.items()})
    assert set(got) == set(want), (got, want)  # a kind the batch lacks is not logged (TRL)
    names = sorted(want)  # rewards cancel (policy - reference): errors relative to the logps' scale
    check(f"kto/{case}/metrics", [got[k] for k in names], [want[k] for k in names])
    assert (got["kl"] == 0.0) == (want["kl"] == 0.0) == (kl_shift > 0)


def test_kto_finite_differences_and_loss_function():
    rng = np.random.default_rng(15)
    pol, ref = rng.normal(-10, 3, 8), rng.normal(-10, 3, 8)
    labels = np.array([1, 1, 0, 1, 0, 0, 1, 0], dtype=bool)
    beta, kl, wd, wu = 0.2, 0.7, 1.2, 0.9

    def ref_loss(p):
        r = p - ref
        return np.where(labels, wd * (1 - np_sigmoid(beta * (r - kl))), wu * (1 - np_sigmoid(beta * (kl - r)))).mean()

    grad = np.array(mx.grad(lambda p: kto_loss(p, f32(ref), f32(labels), kl, beta, wd, wu)[0].mean())(f32(pol)))
    for i in range(len(pol)):
        up, down = pol.copy(), pol.copy()
        up[i] += 1e-5
        down[i] -= 1e-5
        check("kto/finite_difference", grad[i], (ref_loss(up) - ref_loss(down)) / 2e-5, 1e-4)


def test_kto_metrics_average_over_the_micro_batches_that_define_them():
    """TRL appends a micro-batch's rewards/rejected only when it has undesirable examples, and logs the
    mean of what was appended; the Loop averages value x defined and finish_metrics divides."""
    steps = [{"rewards/chosen": 1.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "_defined/chosen": 1.0,
              "_defined/rejected": 0.0, "_defined/margins": 0.0, "kl": 0.5},
             {"rewards/chosen": 3.0, "rewards/rejected": -2.0, "rewards/margins": 5.0, "_defined/chosen": 1.0,
              "_defined/rejected": 1.0, "_defined/margins": 1.0, "kl": 0.1}]
    averaged = {k: (steps[0][k] + steps[1][k]) / 2 for k in steps[0]}
    assert finish_metrics(averaged) == pytest.approx({"rewards/chosen": 2.0, "rewards/rejected": -2.0,
                                                      "rewards/margins": 5.0, "kl": 0.3})
    assert finish_metrics(dict(steps[0])) == {"rewards/chosen": 1.0, "kl": 0.5}


def test_config_defaults_and_errors():
    o, s, k = ORPOConfig(), SimPOConfig(), KTOConfig()
    assert (o.beta, o.learning_rate, o.target_reward_margin) == (0.1, 1e-6, None)
    assert (s.beta, s.gamma, s.cpo_alpha, s.label_smoothing, s.learning_rate) == (2.0, 0.5, 0.0, 0.0, 1e-6)
    assert (k.beta, k.desirable_weight, k.undesirable_weight, k.learning_rate, k.target_reward_margin) == \
        (0.1, 1.0, 1.0, 1e-6, 2.0)
    for bad in (lambda: ORPOConfig(beta=0), lambda: SimPOConfig(gamma=-1), lambda: KTOConfig(batch_size=1),
                lambda: KTOConfig(desirable_wieght=1.0)):
        with pytest.raises(pydantic.ValidationError):
            bad()


# ---------------------------------------------------------------- data
def test_unpaired_dataset_and_kl_rows(tiny, tmp_path):
    _, tok = tiny
    ds = UnpairedDataset(EXAMPLES / "kto.jsonl", tok)
    assert len(ds) == 278 and ds.labels().sum() == 139
    batch = ds.collate([0, 1, 2])
    assert batch["inputs"].shape[0] == 6 and batch["label"].tolist() == [1.0, 0.0, 1.0]
    # KL row k: example k's prompt, then the previous example's completion (TRL's rotation by one)
    e = ds.examples
    kl_row = e[1].ids[: e[1].prompt_len] + e[0].ids[e[0].prompt_len:]
    assert np.array(batch["inputs"][4, : len(kl_row) - 1]).tolist() == kl_row[:-1]
    assert np.array(batch["mask"][4]).sum() == len(e[0].ids) - e[0].prompt_len
    for rec, where in [({"prompt": "a", "completion": "b"}, "label"), ({"prompt": "a", "completion": "b", "label": 1},
                                                                       "label"), ({"prompt": "a", "label": True},
                                                                                  "completion")]:
        with pytest.raises(Exception, match=rf"bad.jsonl:2: field '{where}'"):
            UnpairedDataset(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y", "label": False},
                                                                  rec]), tok)


def test_kto_batches_are_fixed_groups_and_kl_pairs_stay_inside_them(tiny):
    _, tok = tiny
    ds = UnpairedDataset(EXAMPLES / "kto.jsonl", tok)
    loader = KTOBatches(ds, 8, seed=3)
    partner = pair_within_batches(loader)
    groups = [sorted(g.tolist()) for g in loader.epoch_batches(0)]
    assert sorted(map(sorted, loader.epoch_batches(1))) == sorted(groups)  # same groups, another order
    assert [sorted(g.tolist()) for g in loader.epoch_batches(1)] != groups
    for g in groups:
        assert sorted(partner[g].tolist()) == g and all(partner[i] != i for i in g)


# ---------------------------------------------------------------- learning on held-out prompts
def _split(tmp_path):
    """preferences.jsonl's prompts, 109 to train on and 30 held out. The tiny random model cannot learn
    addition in a short run (its held-out preference for the right sum over a near miss stays at
    chance for hundreds of steps), so each pair's dispreferred answer is a sum no question here has."""
    rows = [dict(json.loads(line), rejected="42") for line in (EXAMPLES / "preferences.jsonl").read_text().splitlines()]
    train, held = rows[:109], rows[109:]
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in train
                for k in ("chosen", "rejected")]
    return (write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "kto.jsonl", unpaired),
            write_jsonl(tmp_path / "held.jsonl", held))


def held_out_margins(model, tok, path):
    ds = PreferenceDataset(path, tok)
    batch = ds.collate(list(range(len(ds))))
    logps = np.array(sequence_logps(model, {k: batch[k] for k in ("inputs", "targets", "mask")}))
    return logps[: len(ds)] - logps[len(ds):]


TRAINERS = {"orpo": (ORPOTrainer, ORPOConfig), "simpo": (SimPOTrainer, SimPOConfig), "kto": (KTOTrainer, KTOConfig)}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_learns_to_prefer_on_held_out_prompts(name, tiny, tmp_path):
    model, tok = tiny  # full fine-tuning
    train, unpaired, held = _split(tmp_path)
    before = held_out_margins(model, tok, held)
    trainer_cls, config_cls = TRAINERS[name]
    cfg = config_cls(max_steps=25, batch_size=16, learning_rate=3e-3, warmup_steps=0, log_interval=5,
                     checkpoint_interval=None, checkpoint_dir=str(tmp_path / "ck"))
    result = trainer_cls(model=model, tokenizer=tok, config=cfg).train(unpaired if name == "kto" else train)
    model.eval()
    after = held_out_margins(model, tok, held)
    assert np.mean(after > 0) >= 0.9 > np.mean(before > 0)
    assert after.mean() > before.mean() + 3.0
    assert result.history[-1]["rewards/margins"] > result.history[0]["rewards/margins"]


# ---------------------------------------------------------------- exact resume (LoRA), with an eval set
def flat(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_resume_is_exact(name, tiny_dir, tmp_path):
    data = EXAMPLES / ("kto.jsonl" if name == "kto" else "preferences.jsonl")
    rows = data.read_text().splitlines()
    train, evalset = write_jsonl(tmp_path / "t.jsonl", map(json.loads, rows[:40])), \
        write_jsonl(tmp_path / "e.jsonl", map(json.loads, rows[40:56]))
    trainer_cls, config_cls = TRAINERS[name]

    def run(stop=None, resume=None, out="a"):
        model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4, lora_dropout=0.1)
        cfg = config_cls(max_steps=8, batch_size=8, learning_rate=1e-3, warmup_steps=2, log_interval=1,
                         eval_interval=4, checkpoint_dir=str(tmp_path / out), checkpoint_interval=stop or 1000,
                         target_reward_margin=None)
        trainer = trainer_cls(model=model, tokenizer=tok, config=cfg, callbacks=[stop_at(stop)] if stop else None)
        if resume and name == "kto":
            trainer.reference_logps = None  # the reference cache must come from the checkpoint
        return model, trainer, trainer.train(train, eval_dataset=evalset, resume_from=resume)

    m1, t1, r1 = run()
    run(stop=3, out="b")
    m2, t2, r2 = run(resume=tmp_path / "b" / "step_3.safetensors", out="b")
    if name == "kto":
        np.testing.assert_array_equal(t1.ref_cache["train"], t2.ref_cache["train"])
    w1, w2 = flat(m1), flat(m2)
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k], err_msg=k)
    assert [h.get("loss") for h in r1.history] == [h.get("loss") for h in r2.history]
    assert [h.get("eval/loss") for h in r1.history] == [h.get("eval/loss") for h in r2.history]
    assert any("eval/rewards/margins" in h for h in r1.history)


# ---------------------------------------------------------------- the command line
@pytest.mark.parametrize("name", list(TRAINERS))
def test_cli_trains(name, tiny_dir, tmp_path, capsys):
    data = EXAMPLES / ("kto.jsonl" if name == "kto" else "preferences.jsonl")
    out = tmp_path / name
    rc = main(["train", name, "--model", str(tiny_dir), "--data", str(data), "--output", str(out), "--max-steps", "2",
               "--set", "log_interval=1", "--set", "batch_size=4", "--set", "beta=0.2"] + (["--lora"] if name == "kto"
                                                                                             else []))
    _, err = capsys.readouterr()
    assert rc == 0, err
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert all("rewards/chosen" in h or "rewards/rejected" in h for h in history if "loss" in h)
    assert (out / "checkpoints" / "final.safetensors").exists()


# ---------------------------------------------------------------- two ranks
def test_new_objectives_on_two_ranks_match_one_process(tiny_dir, tmp_path):
    """DPO, ORPO, SimPO, KTO and the reward model on two ranks, each holding half of every global batch, log
    what one process holding all of it logs, with identical weights on both ranks (KTO's KL estimate
    and metrics are over the global batch: a collective inside the loss)."""
    import subprocess
    import sys

    script = Path(__file__).parent / "distributed_objectives.py"
    kto = write_jsonl(tmp_path / "kto.jsonl", map(json.loads, (EXAMPLES / "kto.jsonl").read_text().splitlines()[:48]))
    prefs = write_jsonl(tmp_path / "prefs.jsonl",
                        map(json.loads, (EXAMPLES / "preferences.jsonl").read_text().splitlines()[:48]))
    specs = [f"dpo={prefs}", f"kto={kto}", f"orpo={prefs}", f"simpo={prefs}", f"reward={prefs}"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        out.mkdir()
        cmd = [sys.executable, "-m", "lazarus.launch", "-n", "2", str(script)] if n == 2 else [sys.executable, str(script)]
        p = subprocess.run(cmd + [str(tiny_dir), str(out), *specs], capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[n] = out
    for name in ("dpo", "kto", "orpo", "simpo", "reward"):
        one = json.loads((runs[1] / f"{name}_rank0.json").read_text())
        r0, r1 = (json.loads((runs[2] / f"{name}_rank{r}.json").read_text()) for r in (0, 1))
        assert r0["world"] == 2 and r0["digest"] == r1["digest"] and r0["history"] == r1["history"], name
        if name in ("dpo", "kto"):  # each rank computed half of the reference pass; both hold all of it
            assert r0["ref_cache"] == r1["ref_cache"] and np.asarray(r0["ref_cache"]).shape == (2, 48), name
            assert np.asarray(r0["ref_cache"]) == pytest.approx(np.asarray(one["ref_cache"]), rel=1e-5, abs=1e-5)
            assert (np.asarray(r0["ref_cache"]) < 0).all(), name  # log-probs: no entry left at zero
        assert len(one["history"]) == len(r0["history"]) == 3, name
        for a, b in zip(one["history"], r0["history"]):
            assert a.keys() == b.keys() and "loss" in a, name
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (name, k)
