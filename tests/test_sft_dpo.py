"""SFT and DPO trainers, including the user's guide snippets run as written."""

import math

import mlx.core as mx
import numpy as np
import pydantic
import pytest
from mlx.utils import tree_flatten

from conftest import stop_at as stop_at_step, write_jsonl
from lazarus.callbacks import Checkpoint, EarlyStopping, GradientClipping, LRSchedule
from lazarus.data import PreferenceDataset, SFTDataset
from lazarus.models import load_model
from lazarus.training import (DPOConfig, DPOTrainer, DPOTrainerConfig, SFTConfig, SFTTrainer, dpo_loss)
from lazarus.training.dpo import sequence_logps


def flat(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def greedy(model, tok, prompt, max_tokens=8):
    from mlx_lm.generate import generate

    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return generate(model, tok, text, max_tokens=max_tokens, verbose=False)


# ---------------------------------------------------------------- the guide, as written
def test_guide_sft_snippet(tiny_dir, tmp_path, monkeypatch, examples):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    lines = (examples / "sft_train.jsonl").read_text().splitlines()[:12]
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")

    from lazarus.models import load_model
    from lazarus.training import SFTTrainer, SFTConfig
    from lazarus.data import SFTDataset

    model, tokenizer = load_model(str(tiny_dir), use_lora=True)
    dataset = SFTDataset("./data/train.jsonl", tokenizer)
    config = SFTConfig(num_epochs=3, batch_size=4, learning_rate=1e-5, warmup_steps=100)
    trainer = SFTTrainer(model, tokenizer, config)
    result = trainer.train(dataset)

    assert result.stop_reason == "completed 3 epochs" and result.history[-1]["step"] == 9
    assert (tmp_path / "checkpoints" / "final.safetensors").exists()
    assert (tmp_path / "checkpoints" / "adapters.safetensors").exists()
    trainer.load_checkpoint("./checkpoints/final.safetensors")


def test_guide_dpo_snippet(tiny_dir, tmp_path, monkeypatch, examples):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    lines = (examples / "preferences.jsonl").read_text().splitlines()[:8]
    (tmp_path / "data" / "preferences.jsonl").write_text("\n".join(lines) + "\n")

    from lazarus.training import DPOTrainer, DPOTrainerConfig, DPOConfig
    from lazarus.data import PreferenceDataset

    policy_model, tokenizer = load_model(str(tiny_dir))
    reference_model, _ = load_model(str(tiny_dir))  # Frozen reference
    dataset = PreferenceDataset("./data/preferences.jsonl", tokenizer)
    config = DPOTrainerConfig(dpo=DPOConfig(beta=0.1), learning_rate=1e-6)
    trainer = DPOTrainer(policy_model, reference_model, tokenizer, config)
    result = trainer.train(dataset)

    assert result.history and result.history[-1]["step"] == 6
    assert (tmp_path / "checkpoints" / "final.safetensors").exists()
    trainer.load_checkpoint("./checkpoints/final.safetensors")


def test_config_defaults_match_the_guide_and_errors_name_the_field():
    c = SFTConfig()
    assert (c.num_epochs, c.batch_size, c.learning_rate, c.warmup_steps, c.max_grad_norm, c.checkpoint_interval,
            c.checkpoint_dir, c.mask_prompt) == (3, 4, 1e-5, 100, 1.0, 500, "checkpoints", True)
    d = DPOTrainerConfig()
    assert (d.dpo.beta, d.dpo.loss_type, d.dpo.label_smoothing, d.learning_rate, d.target_reward_margin) == \
        (0.1, "sigmoid", 0.0, 1e-6, 2.0)
    with pytest.raises(pydantic.ValidationError, match="batch_sise"):
        SFTConfig(batch_sise=3)
    with pytest.raises(pydantic.ValidationError, match="learning_rate"):
        SFTConfig(learning_rate=-1)
    with pytest.raises(pydantic.ValidationError, match="loss_type"):
        DPOConfig(loss_type="nope")


def test_user_callback_replaces_default_of_same_kind(tiny):
    model, tok = tiny
    mine = GradientClipping(0.5)
    trainer = SFTTrainer(model, tok, SFTConfig(), callbacks=[mine, Checkpoint("elsewhere", interval=7)])
    clips = [cb for cb in trainer.callbacks if isinstance(cb, GradientClipping)]
    ckpts = [cb for cb in trainer.callbacks if isinstance(cb, Checkpoint)]
    assert clips == [mine] and len(ckpts) == 1 and ckpts[0].interval == 7
    assert any(isinstance(cb, LRSchedule) for cb in trainer.callbacks)


# ---------------------------------------------------------------- SFT learns
def test_sft_loss_goes_down_and_memorises(tiny_dir, tmp_path):
    model, tok = load_model(tiny_dir)
    rows = [{"prompt": "What is 3+4?", "response": "7"}, {"prompt": "Say hello", "response": "hello world"}]
    ds = SFTDataset(write_jsonl(tmp_path / "m.jsonl", rows), tok)
    cfg = SFTConfig(max_steps=60, batch_size=2, learning_rate=3e-3, warmup_steps=5, log_interval=5,
                    checkpoint_dir=str(tmp_path / "ck"), checkpoint_interval=None)
    result = SFTTrainer(model, tok, cfg).train(ds)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < 0.1 * losses[0]
    assert "ppl" in result.history[-1] and "tokens_per_second" in result.history[-1]
    assert 0 <= result.history[-1]["padding_fraction"] < 0.5
    assert greedy(model, tok, "Say hello") == "hello world"
    assert greedy(model, tok, "What is 3+4?") == "7"


def test_sft_eval_and_best_checkpoint(tiny_lora, tmp_path, examples):
    model, tok = tiny_lora
    train = SFTDataset(examples / "sft_train.jsonl", tok)
    ev = SFTDataset(examples / "sft_eval.jsonl", tok)
    cfg = SFTConfig(max_steps=12, batch_size=8, learning_rate=1e-3, warmup_steps=2, eval_interval=4,
                    checkpoint_dir=str(tmp_path), checkpoint_interval=6, log_interval=4)
    trainer = SFTTrainer(model, tok, cfg)
    result = trainer.train(train, eval_dataset=ev)
    evals = [h for h in result.history if "eval/loss" in h]
    assert [h["step"] for h in evals] == [4, 8, 12]
    assert len({h["eval/loss"] for h in evals}) == 3  # each evaluation sees the current weights
    ck = trainer.get_callback(Checkpoint)
    assert ck.monitor == "eval/loss" and ck.best_value == min(h["eval/loss"] for h in evals)
    for name in ("step_6", "step_12", "best", "final"):
        assert (tmp_path / f"{name}.safetensors").exists()


def test_sft_resume_is_exact(tiny_dir, tmp_path, examples):
    def run(max_steps, stop_at=None, resume=None, out="a"):
        model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4, lora_dropout=0.1)
        ds = SFTDataset(examples / "sft_train.jsonl", tok)
        cfg = SFTConfig(max_steps=max_steps, batch_size=8, learning_rate=1e-3, warmup_steps=3, log_interval=2,
                        checkpoint_dir=str(tmp_path / out), checkpoint_interval=stop_at or 1000,
                        grad_accumulation_steps=2, lr_schedule="cosine")
        cbs = [EarlyStopping(monitor="loss", patience=50)]
        trainer = SFTTrainer(model, tok, cfg, callbacks=cbs)
        if stop_at:
            trainer.callbacks.append(stop_at_step(stop_at))
        return model, trainer.train(ds, resume_from=resume)

    m1, r1 = run(8)
    run(8, stop_at=4, out="b")
    m2, r2 = run(8, resume=tmp_path / "b" / "step_4.safetensors", out="b")
    w1, w2 = flat(m1), flat(m2)
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k], err_msg=k)
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]


# ---------------------------------------------------------------- DPO
def test_dpo_loss_matches_independent_formula():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, 16).astype(np.float32) for _ in range(4))
    beta, eps = 0.3, 0.1
    h = (pc - pr) - (rc - rr)

    def logsig(x):
        return -np.log1p(np.exp(-x))

    expected = {
        "sigmoid": -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": np.maximum(0, 1 - beta * h),
    }
    for kind, want in expected.items():
        losses, cr, rj = dpo_loss(*(mx.array(a) for a in (pc, pr, rc, rr)), beta=beta, loss_type=kind,
                                  label_smoothing=eps if kind == "sigmoid" else 0.0)
        np.testing.assert_allclose(np.array(losses), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.array(cr), beta * (pc - rc), rtol=1e-5)
        np.testing.assert_allclose(np.array(rj), beta * (pr - rr), rtol=1e-5)


def test_dpo_policy_equal_reference_starts_at_ln2(tiny_dir, tmp_path, examples):
    policy, tok = load_model(tiny_dir)
    reference, _ = load_model(tiny_dir)
    ds = PreferenceDataset(examples / "preferences.jsonl", tok)
    cfg = DPOTrainerConfig(max_steps=1, batch_size=8, log_interval=1, checkpoint_dir=str(tmp_path))
    result = DPOTrainer(policy, reference, tok, cfg).train(ds)
    first = result.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_dpo_learns_preferences_and_stops_at_target_margin(tiny_dir, tmp_path):
    policy, tok = load_model(tiny_dir)
    reference, _ = load_model(tiny_dir)
    ref_before = flat(reference)
    rows = [{"prompt": f"Pick {i}", "chosen": "yes", "rejected": "no"} for i in range(8)]
    ds = PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", rows), tok)
    cfg = DPOTrainerConfig(max_steps=300, batch_size=8, learning_rate=2e-3, warmup_steps=0, log_interval=2,
                           target_reward_margin=None, checkpoint_dir=str(tmp_path / "ck"), checkpoint_interval=None)
    result = DPOTrainer(policy, reference, tok, cfg,
                        callbacks=[EarlyStopping(target_reward_margin=1.5)]).train(ds)
    assert "target_reward_margin reached" in result.stop_reason
    last = result.history[-1]
    assert last["step"] < 300 and last["rewards/margins"] >= 1.5
    assert last["rewards/accuracies"] == 1.0
    after = flat(reference)
    for k in ref_before:
        np.testing.assert_array_equal(ref_before[k], after[k], err_msg=k)


def test_dpo_lora_reference_is_adapter_disabled_policy(tiny_dir, tmp_path, examples):
    policy, tok = load_model(tiny_dir, use_lora=True, lora_rank=4)
    params = dict(tree_flatten(policy.trainable_parameters()))
    rng = np.random.default_rng(1)
    policy.load_weights([(k, mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32))) for k, v in params.items()],
                        strict=False)
    base, _ = load_model(tiny_dir)
    ds = PreferenceDataset(examples / "preferences.jsonl", tok)
    trainer = DPOTrainer(policy, None, tok, DPOTrainerConfig(batch_size=8))
    cache = trainer.reference_logps(ds)
    batch = ds.collate([0, 1, 2])
    want = np.array(sequence_logps(base, {k: batch[k] for k in ("inputs", "targets", "mask")}))
    np.testing.assert_allclose(cache[0, :3], want[:3], rtol=1e-5)
    np.testing.assert_allclose(cache[1, :3], want[3:], rtol=1e-5)
    with_adapters = np.array(sequence_logps(policy, {k: batch[k] for k in ("inputs", "targets", "mask")}))
    assert not np.allclose(with_adapters[:3], cache[0, :3])


def test_reference_pass_is_shared_between_ranks(tiny_dir, examples):
    """With several ranks each computes every size-th batch of the reference pass; the all_sum
    then adds the others' exact zeros. Here rank 1 of 2 with an identity all_sum (what its own
    share contributes): its batches match a one-process pass, the rest are left to rank 0."""
    from types import SimpleNamespace

    policy, tok = load_model(tiny_dir)
    base, _ = load_model(tiny_dir)
    ds = PreferenceDataset(examples / "preferences.jsonl", tok)
    trainer = DPOTrainer(policy, base, tok, DPOTrainerConfig(batch_size=2))
    whole = trainer.reference_logps(ds)
    sums = []
    trainer.loop = SimpleNamespace(streams=[], ranks=SimpleNamespace(rank=1, size=2, all_sum=lambda x: sums.append(x) or x))
    mine = trainer.reference_logps(ds)
    assert len(sums) == 1 and sums[0].shape == (2, len(ds))
    computed = (mine != 0).all(axis=0)
    assert 0.3 < computed.mean() < 0.7  # about half of the pairs, in whole batches of 4 x batch_size
    np.testing.assert_allclose(mine[:, computed], whole[:, computed], rtol=1e-5)
    assert (mine[:, ~computed] == 0).all() and (whole != 0).all()


def test_dpo_resume_is_exact_including_reference_cache(tiny_dir, tmp_path, examples):
    def run(stop_at=None, resume=None, out="a"):
        policy, tok = load_model(tiny_dir, use_lora=True, lora_rank=4)
        ds = PreferenceDataset(examples / "preferences.jsonl", tok)
        cfg = DPOTrainerConfig(max_steps=8, batch_size=8, learning_rate=1e-3, warmup_steps=2, log_interval=1,
                               checkpoint_dir=str(tmp_path / out), checkpoint_interval=stop_at or 1000,
                               target_reward_margin=None)
        trainer = DPOTrainer(policy, None, tok, cfg)
        if stop_at:
            trainer.callbacks.append(stop_at_step(stop_at))
        if resume:
            trainer.reference_logps = None  # resume must use the cached values from the checkpoint
        return policy, trainer, trainer.train(ds, resume_from=resume)

    m1, t1, r1 = run()
    run(stop_at=3, out="b")
    m2, t2, r2 = run(resume=tmp_path / "b" / "step_3.safetensors", out="b")
    np.testing.assert_array_equal(t1.ref_cache["train"], t2.ref_cache["train"])
    w1, w2 = flat(m1), flat(m2)
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k], err_msg=k)
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]


def test_grad_checkpoint_gives_the_same_training(tiny_dir, tmp_path, examples):
    def run(gc):
        mx.random.seed(0)
        model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4)
        ds = SFTDataset(examples / "sft_train.jsonl", tok)
        cfg = SFTConfig(max_steps=3, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_interval=1,
                        checkpoint_interval=None, checkpoint_dir=str(tmp_path / str(gc)), grad_checkpoint=gc)
        return [h["loss"] for h in SFTTrainer(model, tok, cfg).train(ds).history]

    plain = run(False)
    checkpointed = run(True)
    np.testing.assert_allclose(plain, checkpointed, rtol=1e-5)


def test_config_seed_makes_a_lora_run_reproducible_without_seeding_mlx(tiny_dir, tmp_path, examples):
    """The same script twice in one process (MLX's global RNG in a different state each time):
    load_model seeds the LoRA init, the Loop seeds dropout and data order from the config."""
    def run(out):
        model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4, lora_dropout=0.1)
        cfg = SFTConfig(max_steps=3, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_interval=1, seed=7,
                        checkpoint_interval=None, checkpoint_dir=str(tmp_path / out))
        result = SFTTrainer(model, tok, cfg).train(SFTDataset(examples / "sft_train.jsonl", tok))
        return [h["loss"] for h in result.history], flat(model)

    losses1, w1 = run("a")
    mx.random.uniform(shape=(3,))  # whatever happened in between
    losses2, w2 = run("b")
    assert losses1 == losses2
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k], err_msg=k)


def test_label_smoothing_is_only_for_the_sigmoid_loss():
    for kind in ("ipo", "hinge"):
        with pytest.raises(pydantic.ValidationError, match="label_smoothing"):
            DPOConfig(loss_type=kind, label_smoothing=0.1)
        with pytest.raises(pydantic.ValidationError, match="label_smoothing"):
            DPOTrainerConfig(dpo={"loss_type": kind, "label_smoothing": 0.2})
    assert DPOConfig(loss_type="sigmoid", label_smoothing=0.1).label_smoothing == 0.1
    assert DPOConfig(loss_type="ipo").label_smoothing == 0.0
