"""GRPO: advantage and loss math by hand, the ratio/KL invariants, learning, exact resume."""

import math

import mlx.core as mx
import numpy as np
import pydantic
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from lazarus.checkpointing import read_checkpoint
from lazarus.data import PromptDataset
from lazarus.models import load_model
from conftest import stop_at as stop_callback
from lazarus.state import State
from lazarus.training import GRPOConfig, GRPOTrainer, exact_match, group_advantages, grpo_loss, k3_kl
from lazarus.training.base import token_logps


def flat(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def favour_seven(prompts, completions, **columns):
    """Share of the completion's characters that are '7' (a reward that favours one token)."""
    return [c.count("7") / max(1, len(c)) for c in completions]


def char_hash(prompts, completions, **columns):
    """A dense, arbitrary reward: every completion scores differently."""
    return [(sum(map(ord, c)) % 13) / 13 for c in completions]


# ---------------------------------------------------------------- math by hand
def test_group_advantages_by_hand():
    # unbiased std (n - 1), as torch.std in TRL: [1,0,0,1] -> sqrt(1/3); [3,0,0,0] -> sqrt(6.75/3) = 1.5
    adv, std = group_advantages([1, 0, 0, 1, 2, 2, 2, 2, 3, 0, 0, 0], group_size=4)
    np.testing.assert_allclose(std, [math.sqrt(1 / 3), 0.0, 1.5])
    np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (math.sqrt(1 / 3) + 1e-4))
    np.testing.assert_allclose(adv[4:8], 0.0)
    np.testing.assert_allclose(adv[8:], np.array([2.25, -0.75, -0.75, -0.75]) / (1.5 + 1e-4))
    raw, _ = group_advantages([1, 0, 0, 1], group_size=4, scale_rewards=False)
    np.testing.assert_allclose(raw, [0.5, -0.5, -0.5, 0.5])
    # a completion no reward function scored (NaN) is left out of its group and gets advantage 0
    adv, std = group_advantages([1, np.nan, 0, 2], group_size=4)
    np.testing.assert_allclose(std, [1.0])
    np.testing.assert_allclose(adv, np.array([0.0, 0.0, -1.0, 1.0]) / (1.0 + 1e-4))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1, 2, 3], group_size=4)


def _hand_case():
    # ratios r = exp(logp - old), old = 0; row 0 has 2 completion tokens, row 1 has 3
    ratio = np.array([[1.0, 1.5, 1.0], [0.5, 1.0, 1.1]], dtype=np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]], dtype=np.float32)
    adv = np.array([1.0, -0.5], dtype=np.float32)
    return mx.array(np.log(ratio)), mx.array(np.zeros_like(ratio)), mx.array(mask), mx.array(adv)


def test_grpo_loss_by_hand_for_each_loss_type():
    logps, old, mask, adv = _hand_case()
    # eps 0.2: row 0 (A=+1) min(r, clip(r)) = [1, 1.2] -> token losses [-1, -1.2]
    #          row 1 (A=-.5) min(-.5 r, -.5 clip(r)) = [-.4, -.5, -.55] -> token losses [.4, .5, .55]
    expected = {"grpo": ((-1 - 1.2) / 2 + (0.4 + 0.5 + 0.55) / 3) / 2,
                "dapo": (-2.2 + 1.45) / 5,
                "dr_grpo": (-2.2 + 1.45) / (2 * 4)}
    for kind, want in expected.items():
        loss, m = grpo_loss(logps, mask, adv, old, loss_type=kind, clip_epsilon=0.2, max_completion_length=4)
        assert loss.item() == pytest.approx(want, abs=1e-6), kind
        # clipped terms active: row 0 token 1 (1.5 > 1.2, A>0) and row 1 token 0 (0.5 < 0.8, A<0)
        assert m["clip_ratio"].item() == pytest.approx(2 / 5)
        assert "kl" not in m
    # clip higher (DAPO): upper range 0.6 leaves 1.5 unclipped
    loss, m = grpo_loss(logps, mask, adv, old, loss_type="dapo", clip_epsilon=0.2, clip_epsilon_high=0.6)
    assert loss.item() == pytest.approx((-1 - 1.5 + 1.45) / 5, abs=1e-6)
    assert m["clip_ratio"].item() == pytest.approx(1 / 5)
    # KL term: ref - logp = ln 2 on every token -> k3 = 2 - ln2 - 1
    k3 = 1 - math.log(2)
    loss, m = grpo_loss(logps, mask, adv, old, logps + math.log(2), beta=0.1, loss_type="dapo")
    assert loss.item() == pytest.approx((-2.2 + 1.45) / 5 + 0.1 * k3, abs=1e-6)
    assert m["kl"].item() == pytest.approx(k3, abs=1e-6)


def test_grpo_loss_gradient_without_old_logps_is_policy_gradient():
    logps, _, mask, adv = _hand_case()

    def f(lp):
        return grpo_loss(lp, mask, adv, None, loss_type="dapo")[0]

    loss, grad = mx.value_and_grad(f)(logps)
    # ratio == 1 in value, so the loss is -mean(A) over tokens and d/dlogp = -A / ntokens
    assert loss.item() == pytest.approx(-(2 * 1.0 + 3 * -0.5) / 5, abs=1e-7)
    want = -np.array(adv)[:, None] * np.array(mask) / 5
    np.testing.assert_allclose(np.array(grad), want, atol=1e-7)


def test_k3_kl_is_nonnegative_and_zero_at_reference():
    rng = np.random.default_rng(0)
    a = mx.array(rng.normal(-3, 2, (64, 16)).astype(np.float32))
    b = mx.array(rng.normal(-3, 2, (64, 16)).astype(np.float32))
    assert mx.all(k3_kl(a, b) >= 0).item()
    assert mx.all(k3_kl(a, a) == 0).item()


def test_config_validation():
    with pytest.raises(pydantic.ValidationError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(pydantic.ValidationError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(pydantic.ValidationError, match="gamma"):
        GRPOConfig(gamma=0.9)
    c = GRPOConfig()
    assert c.learning_rate == 1e-6 and c.warmup_steps == 0 and c.beta == 0.0


# ---------------------------------------------------------------- on a tiny model
def _trainer(tiny, tmp_path, examples, **kw):
    model, tok = tiny
    ds = PromptDataset(examples / "prompts_train.jsonl", tok)
    cfg = dict(group_size=4, max_completion_length=8, batch_size=4, learning_rate=1e-3, max_steps=4,
               checkpoint_interval=None, checkpoint_dir=str(tmp_path / "ck"), log_interval=1)
    cfg.update(kw)
    return GRPOTrainer(model, tok, GRPOConfig(**cfg), reward_fn=favour_seven), ds


def test_first_pass_ratio_is_exactly_one(tiny, tmp_path, examples):
    trainer, ds = _trainer(tiny, tmp_path, examples, clip_epsilon=1e-7)
    batches = trainer.rollout(State(), ds.collate([0, 1, 2, 3])).batches
    assert len(batches) == 1 and "old_logps" not in batches[0] and "ref_logps" not in batches[0]
    arrays = {k: v for k, v in batches[0].items() if isinstance(v, mx.array)}
    loss, metrics = trainer.compute_loss(trainer.model, arrays)
    assert metrics["clip_ratio"].item() == 0.0  # even a 1e-7 clip range never binds
    # two iterations: the first pass is scored against the sampling policy's own log-probs
    trainer, ds = _trainer(tiny, tmp_path, examples, num_iterations=2, num_minibatches=2, beta=0.1)
    trainer.snapshot_reference()  # what train() does first
    batches, metrics = trainer.rollout(State(), ds.collate([0, 1, 2, 3]))
    assert len(batches) == 4
    b = batches[0]
    lp = token_logps(trainer.model, b["inputs"], b["targets"], 1.0)
    diff = mx.abs(lp - b["old_logps"]) * b["mask"]
    assert mx.max(diff).item() < 1e-5
    assert mx.max(mx.abs(b["ref_logps"] - b["old_logps"]) * b["mask"]).item() < 1e-5  # ref = start weights
    # the rollout's metrics travel beside its batches (host floats), not inside them
    assert set(metrics) == {"reward", "reward_std", "rewards/favour_seven", "frac_reward_zero_std",
                            "completions/mean_length", "completions/min_length", "completions/max_length",
                            "completions/clipped_ratio"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert not any(k.startswith("log/") for b in batches for k in b)
    loss, step_metrics = trainer.compute_loss(trainer.model, {k: v for k, v in b.items() if isinstance(v, mx.array)})
    assert set(step_metrics) == {"kl", "clip_ratio"}


def test_grpo_raises_a_token_reward(tiny, tmp_path, examples):
    trainer, ds = _trainer(tiny, tmp_path, examples, max_steps=24, group_size=8, learning_rate=3e-3)
    result = trainer.train(ds)
    rewards = [h["reward"] for h in result.history if "reward" in h]
    assert len(rewards) == 24
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last > first + 0.4, (first, last)
    h = result.history[-1]
    for k in ("loss", "reward", "reward_std", "rewards/favour_seven", "frac_reward_zero_std", "clip_ratio",
              "completions/mean_length", "completions/clipped_ratio", "timing/rollout_share"):
        assert k in h and math.isfinite(h[k]), k
    assert 0 < h["timing/rollout_share"] < 1


def test_lora_reference_is_the_adapter_free_base(tiny_dir, tmp_path, examples):
    model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4)
    base, _ = load_model(tiny_dir)
    rng = np.random.default_rng(0)  # make the adapters matter: random LoRA A and B
    model.update(tree_unflatten([(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    trainer = GRPOTrainer(model, tok, GRPOConfig(beta=0.1, group_size=2, max_completion_length=4),
                          reward_fn=favour_seven)
    ds = PromptDataset(examples / "prompts_train.jsonl", tok)
    ids = ds.examples[0].ids + [5, 6, 7]
    x, y = mx.array([ids[:-1]]), mx.array([ids[1:]])
    ref = trainer.reference_logps(x, y, chunk=1)
    np.testing.assert_allclose(np.array(ref), np.array(token_logps(base, x, y)), atol=1e-5)
    assert mx.max(mx.abs(token_logps(model, x, y) - ref)).item() > 1e-3  # the policy itself differs


def test_grpo_resume_is_exact_mid_rollout(tiny_dir, tmp_path, examples):
    def run(stop_at=None, resume=None, out="a"):
        model, tok = load_model(tiny_dir)
        ds = PromptDataset(examples / "prompts_train.jsonl", tok)
        cfg = GRPOConfig(group_size=4, max_completion_length=6, batch_size=4, learning_rate=2e-3, max_steps=7,
                         num_iterations=2, num_minibatches=2, beta=0.05, clip_epsilon_high=0.3, log_interval=1,
                         checkpoint_dir=str(tmp_path / out), checkpoint_interval=stop_at or 1000, seed=3)
        trainer = GRPOTrainer(model, tok, cfg, reward_funcs=[char_hash, exact_match()], reward_weights=[1, 2],
                              callbacks=[stop_callback(stop_at)] if stop_at else None)
        return model, trainer, trainer.train(ds, resume_from=resume)

    m1, t1, r1 = run()
    run(stop_at=3, out="b")  # 4 optimizer steps per rollout: step 3 leaves one batch pending
    _, arrays, doc = read_checkpoint(tmp_path / "b" / "step_3.safetensors")
    assert len(doc["pending"]) == 1 and any(k.startswith("trainer.ref_params.") for k in arrays)
    m2, t2, r2 = run(resume=tmp_path / "b" / "step_3.safetensors", out="b")
    w1, w2 = flat(m1), flat(m2)
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k], err_msg=k)
    keys = ("loss", "reward", "kl", "clip_ratio", "rewards/exact_match_answer")
    assert [[h[k] for k in keys] for h in r1.history] == [[h[k] for k in keys] for h in r2.history]
    assert len(r1.history) == 7 and r1.history[-1]["kl"] > 0


def test_grpo_evaluate_and_guide_snippet(tiny_dir, tmp_path, monkeypatch, examples):
    monkeypatch.chdir(tmp_path)
    from lazarus.training import GRPOConfig, GRPOTrainer

    model, tok = load_model(str(tiny_dir), use_lora=True)

    def reward_fn(prompts: list[str], completions: list[str], **columns) -> list[float]:
        return [float(c.strip() == a) for c, a in zip(completions, columns["answer"])]

    prompts = PromptDataset(examples / "prompts_eval.jsonl", tok)
    trainer = GRPOTrainer(model, tok, GRPOConfig(group_size=4, max_completion_length=64, max_steps=2),
                          reward_fn=reward_fn)
    result = trainer.train(prompts, eval_dataset=prompts)
    assert result.stop_reason.startswith("max_steps") and (tmp_path / "checkpoints" / "final.safetensors").exists()
    assert (tmp_path / "checkpoints" / "adapters.safetensors").exists()
    ev = trainer.evaluate(examples / "prompts_eval.jsonl")
    assert set(ev) == {"reward", "rewards/reward_fn", "completions/mean_length", "completions/min_length",
                       "completions/max_length", "completions/clipped_ratio"}  # RL evaluation has no loss
    assert 0 <= ev["reward"] <= 1
    # the run's own evaluation (at the end) logs the same names under eval/, the steps their TRL names
    evals = [h for h in result.history if any(k.startswith("eval/") for k in h)]
    assert len(evals) == 1 and set(evals[0]) == {"step"} | {f"eval/{k}" for k in ev}
    assert evals[0]["eval/reward"] == pytest.approx(ev["reward"])  # same weights, greedy both times
    steps = [h for h in result.history if "loss" in h]
    assert len(steps) == 1 and {"reward", "reward_std", "rewards/reward_fn", "frac_reward_zero_std", "clip_ratio",
                                "completions/mean_length", "timing/rollout_share"} <= set(steps[0])


def test_example_runs_quick(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "grpo_arithmetic.py"
    spec = importlib.util.spec_from_file_location("grpo_arithmetic", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick", "--output", str(tmp_path)])
    assert set(out["before"]) == set(out["after"]) == {"greedy", "sampled"}
    assert len(out["history"]) == 3 and all(math.isfinite(h["loss"]) for h in out["history"])


def test_unset_monitors_watch_the_reward_in_online_rl(tiny, tmp_path, examples):
    """RL evaluation logs no eval/loss: EarlyStopping and Checkpoint left without a monitor watch
    eval/reward (mode max), as the trainer's default_monitor says; an explicit eval/loss warns."""
    import warnings
    from lazarus.callbacks import Checkpoint, EarlyStopping

    model, tok = tiny
    ds = PromptDataset(examples / "prompts_train.jsonl", tok)
    es = EarlyStopping(stopping_threshold=0.5)
    ck = Checkpoint(str(tmp_path / "ck"), interval=None)
    trainer = GRPOTrainer(model, tok, GRPOConfig(group_size=2, max_completion_length=2, max_steps=1, log_interval=1),
                          reward_fn=favour_seven, callbacks=[es, ck])
    trainer.train(ds, eval_dataset=ds)
    assert (es.monitor, es.mode, es.stopping_threshold) == ("eval/reward", "max", 0.5)
    assert (ck.monitor, ck.mode) == ("eval/reward", "max")
    wrong = EarlyStopping(monitor="eval/loss")
    trainer = GRPOTrainer(model, tok, GRPOConfig(group_size=2, max_completion_length=2, max_steps=1, log_interval=1,
                                                 checkpoint_interval=None),
                          reward_fn=favour_seven, callbacks=[wrong, Checkpoint(str(tmp_path / "ck2"), interval=None)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(ds, eval_dataset=ds)
    assert any("eval/loss" in str(w.message) and "eval/reward" in str(w.message) for w in caught)

def test_wrong_dataset_kind_is_a_clear_error(tiny, tmp_path, examples):
    from lazarus.data import SFTDataset

    model, tok = tiny
    trainer = GRPOTrainer(model, tok, GRPOConfig(max_steps=1), reward_fn=favour_seven)
    with pytest.raises(TypeError, match="PromptDataset"):
        trainer.train(SFTDataset(examples / "sft_train.jsonl", tok))
    with pytest.raises(ValueError, match="at least one reward function"):
        GRPOTrainer(model, tok, GRPOConfig())


def test_planned_steps_count_every_batch_of_a_rollout(tiny, tmp_path):
    """Without max_steps, the LR decay horizon and the progress total are prompt batches x
    optimizer steps per rollout (State.planned_steps), not prompt batches alone."""
    from conftest import write_jsonl
    from lazarus.callbacks import LRSchedule

    model, tok = tiny
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)])
    cfg = GRPOConfig(num_epochs=1, batch_size=2, group_size=2, max_completion_length=3, num_iterations=2,
                     num_minibatches=2, lr_schedule="linear", log_interval=1, checkpoint_interval=None,
                     checkpoint_dir=str(tmp_path / "ck"))
    trainer = GRPOTrainer(model, tok, cfg, reward_fn=exact_match())
    result = trainer.train(prompts)
    assert result.state.planned_steps == 2 * 4 == result.state.step
    assert trainer.get_callback(LRSchedule).total_steps == 8


# ---------------------------------------------------------------- off-policy minibatches (TRL parity)
def test_second_minibatch_is_scored_against_the_sampler_and_clips(tiny, tmp_path, examples):
    """One generation, two optimizer steps: the second step's weights already moved, so its ratio
    is not 1 and the clip engages (it was exactly 1 when old log-probs were only kept for
    num_iterations > 1)."""
    trainer, ds = _trainer(tiny, tmp_path, examples, num_minibatches=2, max_steps=2, learning_rate=1e-2,
                           clip_epsilon=0.05)
    trainer.rewards.funcs[0] = char_hash  # dense rewards: every completion carries signal
    history = trainer.train(ds).history
    assert [h["step"] for h in history] == [1, 2]
    assert history[0]["clip_ratio"] == 0.0  # the first step runs on the sampling weights
    assert history[1]["clip_ratio"] > 0.0


def test_dapo_normalises_by_the_whole_generation_batch(tiny, tmp_path, examples):
    """TRL's dapo: each minibatch's token sum / the completion tokens of the whole generation
    batch (not the minibatch's own), with equal weight per rank."""
    trainer, ds = _trainer(tiny, tmp_path, examples, num_minibatches=2)
    trainer.rewards.funcs[0] = char_hash
    batches = trainer.rollout(State(), ds.collate([0, 1, 2, 3])).batches
    assert len(batches) == 2 and all("old_logps" in b for b in batches)
    total_tokens = sum(b["num_tokens"] for b in batches)
    assert 0 < batches[0]["num_tokens"] < total_tokens
    for b in batches:
        assert b["loss_normalizer"].item() == total_tokens and b["loss_weight"].item() == 1.0
        arrays = {k: v for k, v in b.items() if isinstance(v, mx.array)}
        loss = trainer.compute_loss(trainer.model, arrays)[0].item()
        # at the sampling weights the ratio is 1: the loss is -(A summed over this minibatch's tokens) / all tokens
        want = -(np.array(b["advantages"])[:, None] * np.array(b["mask"])).sum() / total_tokens
        assert abs(want) > 1e-3 and loss == pytest.approx(want, rel=1e-4)


def test_completions_no_reward_function_scored_get_advantage_zero(tiny, tmp_path, examples):
    def sometimes(prompts, completions, **_):
        return [None if i % 4 < 2 else char_hash([], [c])[0] for i, c in enumerate(completions)]

    def rarely(prompts, completions, **_):
        return [None if i % 4 == 0 else float(len(c) % 3) for i, c in enumerate(completions)]

    model, tok = tiny
    trainer = GRPOTrainer(model, tok, GRPOConfig(group_size=4, max_completion_length=6, batch_size=4),
                          reward_funcs=[sometimes, rarely])
    ds = PromptDataset(examples / "prompts_train.jsonl", tok)
    adv = np.array(trainer.rollout(State(), ds.collate([0, 1, 2, 3])).batches[0]["advantages"])
    comps = trainer.last_completions.texts
    total = np.array([(0.0 if i % 4 < 2 else char_hash([], [c])[0]) + (np.nan if i % 4 == 0 else len(c) % 3)
                      for i, c in enumerate(comps)])
    want, _ = group_advantages(total, 4)  # NaN where both returned None: left out of the group
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    assert np.all(adv[::4] == 0.0)
