"""Batches split across concurrent CPU streams (cpu_streams): same training, BLAS threads restored."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lazarus import _blas
from lazarus.callbacks import Callback
from lazarus.data import DataLoader, SFTDataset
from lazarus.models import load_model
from lazarus.training import DPOTrainer, DPOTrainerConfig, SFTConfig, SFTTrainer


def test_shards_cover_the_batch_once_with_its_width(tiny, examples):
    _, tok = tiny
    ds = SFTDataset(examples / "sft_train.jsonl", tok)
    loader = DataLoader(ds, batch_size=8, seed=3)
    for i in range(len(loader)):
        whole = loader.get_batch(0, i)
        shards = loader.get_batch_shards(0, i, 2)
        assert len(shards) == 2
        assert sum(s["inputs"].shape[0] for s in shards) == whole["inputs"].shape[0]
        assert all(s["inputs"].shape[1] == whole["inputs"].shape[1] for s in shards)  # no new shapes to trace
        assert sum(int(s["num_tokens"]) for s in shards) == int(whole["num_tokens"])
        assert sum(float(s["loss_weight"]) for s in shards) == pytest.approx(float(whole["loss_weight"]))
    assert len(DataLoader(ds, batch_size=1).get_batch_shards(0, 0, 2)) == 1  # never an empty shard


class BlasThreadsAtStepEnd(Callback):
    def __init__(self):
        self.threads = []

    def on_step_end(self, state):
        self.threads.append(_blas.get_threads())


def _sft(tiny_dir, examples, tmp_path, streams, accumulation=1):
    mx.random.seed(0)
    model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4)
    cfg = SFTConfig(max_steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_interval=1,
                    grad_accumulation_steps=accumulation, checkpoint_interval=None,
                    checkpoint_dir=str(tmp_path / f"s{streams}a{accumulation}"), cpu_streams=streams)
    probe = BlasThreadsAtStepEnd()
    trainer = SFTTrainer(model, tok, cfg, callbacks=[probe])
    result = trainer.train(examples / "sft_train.jsonl")
    assert trainer.loop.cpu_streams == streams
    return [h["loss"] for h in result.history if "loss" in h], dict(tree_flatten(model.trainable_parameters())), probe


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_streams_train_like_one(tiny_dir, examples, tmp_path, accumulation):
    before = _blas.get_threads()
    one, w1, _ = _sft(tiny_dir, examples, tmp_path, 1, accumulation)
    two, w2, probe = _sft(tiny_dir, examples, tmp_path, 2, accumulation)
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two, one, rtol=1e-4)  # token-weighted shards = the whole batch's token mean
    for k in w1:
        np.testing.assert_allclose(np.array(w2[k]), np.array(w1[k]), rtol=1e-3, atol=1e-5, err_msg=k)
    assert _blas.get_threads() == before  # one BLAS thread per stream only while a step runs
    assert probe.threads == [before] * 6


def test_dpo_pairs_stay_together_across_streams(tiny_dir, examples, tmp_path):
    losses, caches = {}, {}
    for streams in (1, 2):
        mx.random.seed(0)
        policy, tok = load_model(tiny_dir, use_lora=True, lora_rank=4)
        cfg = DPOTrainerConfig(max_steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_interval=1,
                               checkpoint_interval=None, checkpoint_dir=str(tmp_path / str(streams)),
                               target_reward_margin=None, cpu_streams=streams)
        trainer = DPOTrainer(policy, None, tok, cfg)
        history = trainer.train(examples / "preferences.jsonl").history
        losses[streams] = [h["loss"] for h in history if "loss" in h]
        caches[streams] = trainer.ref_cache["train"]
    np.testing.assert_allclose(caches[2], caches[1], rtol=1e-5)  # the reference pass, split across streams
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)


def test_cpu_streams_is_validated(tiny, examples):
    import mlx.optimizers as optim
    import pydantic

    from lazarus import Loop

    with pytest.raises(pydantic.ValidationError, match="cpu_streams"):
        SFTConfig(cpu_streams=0)
    model, tok = tiny
    loader = DataLoader(SFTDataset(examples / "sft_train.jsonl", tok), batch_size=4)
    with pytest.raises(ValueError, match="cpu_streams must be >= 1, got 0"):
        Loop(model, optim.SGD(learning_rate=0.1), lambda m, b: (mx.array(0.0), {}), loader, cpu_streams=0)
