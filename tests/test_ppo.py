"""PPO: GAE / whitening / loss math by hand, the value head, learning, exact resume."""

import math

import mlx.core as mx
import numpy as np
import pydantic
import pytest
from mlx.utils import tree_flatten

from lazarus.checkpointing import read_checkpoint, read_weights
from lazarus.data import PromptDataset
from lazarus.models import load_model
from conftest import stop_at as stop_callback
from lazarus.state import State
from lazarus.training import PolicyWithValueHead, PPOConfig, PPOTrainer, gae, ppo_loss, whiten


def flat(module):
    return {k: np.array(v) for k, v in tree_flatten(module.parameters())}


def favour_seven(prompts, completions, **columns):
    return [c.count("7") / max(1, len(c)) for c in completions]


def char_hash(prompts, completions, **columns):
    return [(sum(map(ord, c)) % 13) / 13 for c in completions]


# ---------------------------------------------------------------- math by hand
def test_gae_by_hand():
    # one row: a prompt position (masked), three completion tokens, then padding
    rewards = np.array([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = np.array([[9.0, 0.5, 0.6, 0.7, 9.0]])
    mask = np.array([[0, 1, 1, 1, 0]], dtype=np.float32)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t3: 1 - .7 = .3; t2: (.7 - .6) + .95*.3 = .385; t1: (.6 - .5) + .95*.385 = .46575
    np.testing.assert_allclose(adv, [[0, 0.46575, 0.385, 0.3, 0]], atol=1e-12)
    np.testing.assert_allclose(ret, [[0, 0.96575, 0.985, 1.0, 0]], atol=1e-12)
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # t3: .3; t2: (.5*.7 - .6) + .5*.3 = -.1; t1: (.5*.6 - .5) + .5*-.1 = -.25
    np.testing.assert_allclose(adv, [[0, -0.25, -0.1, 0.3, 0]], atol=1e-12)


def test_whiten_over_the_mask():
    x = np.array([[1.0, 2.0, 3.0, 100.0]])
    m = np.array([[1, 1, 1, 0]])
    w = whiten(x, m)
    # unbiased variance (TRL's masked_var): ((1 + 0 + 1) / 3) * 3 / 2 = 1
    np.testing.assert_allclose(w[0, :3], np.array([-1, 0, 1]) / math.sqrt(1 + 1e-8))
    assert w[0, 3] == 0
    np.testing.assert_allclose(whiten(x, m, shift_mean=False)[0, :3], np.array([-1, 0, 1]) / math.sqrt(1 + 1e-8) + 2)


def test_ppo_loss_by_hand():
    ratio = np.array([[1.5, 0.5, 1.0]], dtype=np.float32)
    logps = mx.array(np.log(ratio))
    old = mx.zeros((1, 3))
    mask = mx.array([[1.0, 1.0, 0.0]])
    adv = mx.array([[1.0, 1.0, 5.0]])
    values = mx.array([[0.5, 1.0, 0.0]])
    old_values = mx.array([[0.0, 1.0, 0.0]])
    returns = mx.array([[1.0, 0.0, 0.0]])
    loss, m = ppo_loss(logps, values, mask, old, old_values, adv, returns, clip_epsilon=0.2,
                       value_clip_epsilon=0.2, vf_coef=0.5)
    # policy: max(-1.5, -1.2) = -1.2 ; max(-.5, -.8) = -.5 -> mean -.85, clipped on token 0 only
    # value: token0 v=.5 clipped to .2: max(.25, .64) = .64 ; token1: max(1, 1) = 1 -> .5 * mean = .41
    assert m["policy_loss"].item() == pytest.approx(-0.85, abs=1e-6)
    assert m["value_loss"].item() == pytest.approx(0.41, abs=1e-6)
    assert loss.item() == pytest.approx(-0.85 + 0.5 * 0.41, abs=1e-6)
    assert m["clip_ratio"].item() == pytest.approx(0.5)
    assert m["value_clip_ratio"].item() == pytest.approx(0.5)
    assert m["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2, abs=1e-6)


def test_config_validation():
    with pytest.raises(pydantic.ValidationError, match="gae_lambda"):
        PPOConfig(gae_lambda=1.5)
    with pytest.raises(pydantic.ValidationError, match="grad_accumulation_steps"):
        PPOConfig(grad_accumulation_steps=2)
    c = PPOConfig()
    assert (c.gamma, c.gae_lambda, c.vf_coef, c.ppo_epochs, c.clip_epsilon) == (1.0, 0.95, 0.1, 4, 0.2)


# ---------------------------------------------------------------- on a tiny model
def test_value_head_wraps_policy_without_renaming(tiny, tiny_lora):
    for model, _ in (tiny, tiny_lora):
        vm = PolicyWithValueHead(model)
        x = mx.array([[3, 4, 5, 6, 7]])
        logits, values = vm.logits_and_values(x)
        np.testing.assert_allclose(np.array(logits), np.array(model(x)), atol=1e-5)
        assert values.shape == (1, 5) and mx.all(values == 0).item()  # zero-initialised head
        keys = {k for k, _ in tree_flatten(vm.trainable_parameters())}
        own = {k for k, _ in tree_flatten(model.trainable_parameters())}
        assert keys == own | {"value_head.weight", "value_head.bias"}


def _trainer(model, tok, tmp_path, examples, **kw):
    ds = PromptDataset(examples / "prompts_train.jsonl", tok)
    cfg = dict(max_completion_length=8, batch_size=16, learning_rate=1e-3, max_steps=4, ppo_epochs=2, beta=0.0,
               checkpoint_interval=None, checkpoint_dir=str(tmp_path / "ck"), log_interval=1)
    reward_fn = kw.pop("reward_fn", favour_seven)
    cfg.update(kw)
    return PPOTrainer(model, tok, PPOConfig(**cfg), reward_fn=reward_fn), ds


def test_ppo_rollout_batches(tiny, tmp_path, examples):
    model, tok = tiny
    trainer, ds = _trainer(model, tok, tmp_path, examples, group_size=2, ppo_epochs=3, num_minibatches=2,
                           beta=0.1, missing_eos_penalty=1.0)
    trainer.snapshot_reference()  # what train() does first
    batches, metrics = trainer.rollout(State(), ds.collate(list(range(8))))
    assert len(batches) == 6
    b = batches[0]
    assert b["inputs"].shape[0] == 8 and b["advantages"].shape == b["mask"].shape
    adv = np.array(b["advantages"])[np.array(b["mask"]) > 0]
    assert abs(adv.mean()) < 0.5  # whitened over the whole rollout, this is one half of it
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    assert {"reward", "reward_std", "rewards/favour_seven", "non_score_reward", "completions/mean_length"} <= set(metrics)
    # the first minibatch is scored by the sampling policy: ratio 1 up to float noise
    logits, values = trainer.value_model.logits_and_values(b["inputs"])
    from lazarus.training.base import logps_from_logits
    lp = logps_from_logits(logits, b["targets"])
    assert (mx.max(mx.abs(lp - b["old_logps"]) * b["mask"])).item() < 1e-5
    assert (mx.max(mx.abs(values - b["old_values"]) * b["mask"])).item() < 1e-6


def test_ppo_raises_a_token_reward(tiny, tmp_path, examples):
    model, tok = tiny
    trainer, ds = _trainer(model, tok, tmp_path, examples, max_steps=40, batch_size=32, beta=0.01)
    result = trainer.train(ds)
    rewards = [h["reward"] for h in result.history]
    first, last = np.mean(rewards[:6]), np.mean(rewards[-6:])
    assert last > first + 0.4, (first, last)
    h = result.history[-1]
    for k in ("loss", "policy_loss", "value_loss", "reward", "kl", "clip_ratio", "value_clip_ratio",
              "completions/mean_length", "timing/rollout_share"):
        assert k in h and math.isfinite(h[k]), k


def test_ppo_resume_is_exact_including_value_head(tiny_dir, tmp_path, examples):
    def run(stop_at=None, resume=None, out="a"):
        model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4)
        trainer, ds = _trainer(model, tok, tmp_path, examples, reward_fn=char_hash, batch_size=4, group_size=2,
                               max_steps=7, ppo_epochs=2, num_minibatches=2, beta=0.05, seed=5,
                               max_completion_length=6, checkpoint_dir=str(tmp_path / out),
                               checkpoint_interval=stop_at or 1000)
        if stop_at:
            trainer.callbacks.append(stop_callback(stop_at))
        return trainer, trainer.train(ds, resume_from=resume)

    t1, r1 = run()
    run(stop_at=3, out="b")
    _, _, doc = read_checkpoint(tmp_path / "b" / "step_3.safetensors")
    assert len(doc["pending"]) == 1
    saved, _ = read_weights(tmp_path / "b" / "step_3.safetensors")
    assert {"value_head.weight", "value_head.bias"} <= set(saved)
    t2, r2 = run(resume=tmp_path / "b" / "step_3.safetensors", out="b")
    w1, w2 = flat(t1.value_model), flat(t2.value_model)
    assert np.abs(w1["value_head.weight"]).max() > 0  # the head did learn
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k], err_msg=k)
    keys = ("loss", "value_loss", "policy_loss", "reward", "kl")
    assert [[h[k] for k in keys] for h in r1.history] == [[h[k] for k in keys] for h in r2.history]

    # a fresh trainer loads policy adapters and value head from the checkpoint
    model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4)
    t3 = PPOTrainer(model, tok, PPOConfig(), reward_fn=char_hash)
    t3.load_checkpoint(tmp_path / "a" / "final.safetensors")
    w3 = flat(t3.value_model)
    for k in w1:
        np.testing.assert_array_equal(w1[k], w3[k], err_msg=k)
    assert (tmp_path / "a" / "adapters.safetensors").exists()
    adapters, _ = read_weights(tmp_path / "a" / "adapters.safetensors")
    assert not any(k.startswith("value_head") for k in adapters)


def test_example_runs_quick(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "ppo_arithmetic.py"
    spec = importlib.util.spec_from_file_location("ppo_arithmetic", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick", "--output", str(tmp_path)])
    assert set(out["before"]) == {"train_reward", "heldout_greedy", "heldout_sampled"}
    assert len(out["history"]) == 4 and all(math.isfinite(h["value_loss"]) for h in out["history"])
