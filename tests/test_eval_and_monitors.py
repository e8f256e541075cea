"""An eval set is evaluated without extra settings, and a monitor that never appears is reported."""

import warnings

import pytest

from lazarus.callbacks import Checkpoint, EarlyStopping
from lazarus.data import SFTDataset
from lazarus.training import SFTConfig, SFTTrainer


def train(tiny, examples, tmp_path, callbacks=(), **cfg):
    model, tok = tiny
    ds = SFTDataset(examples / "sft_train.jsonl", tok)
    ev = SFTDataset(examples / "sft_eval.jsonl", tok)
    config = SFTConfig(batch_size=32, learning_rate=1e-3, warmup_steps=0, checkpoint_dir=str(tmp_path / "ck"),
                       checkpoint_interval=None, **cfg)
    return SFTTrainer(model, tok, config, callbacks=list(callbacks)).train(ds, eval_dataset=ev)


def eval_steps(result):
    return [h["step"] for h in result.history if "eval/loss" in h]


def test_eval_set_without_interval_is_evaluated_every_epoch_and_best_is_written(tiny, examples, tmp_path):
    result = train(tiny, examples, tmp_path, num_epochs=2)
    per_epoch = result.state.steps_per_epoch
    assert eval_steps(result) == [per_epoch, 2 * per_epoch]
    assert (tmp_path / "ck" / "best.safetensors").exists()


def test_a_run_that_stops_mid_epoch_is_evaluated_at_the_end(tiny, examples, tmp_path):
    result = train(tiny, examples, tmp_path, max_steps=3)
    assert 3 < result.state.steps_per_epoch and eval_steps(result) == [3]
    assert (tmp_path / "ck" / "best.safetensors").exists()


def test_an_explicit_interval_is_left_alone(tiny, examples, tmp_path):
    result = train(tiny, examples, tmp_path, max_steps=4, eval_interval=2)
    assert eval_steps(result) == [2, 4]


def test_a_monitor_that_never_appears_warns_once_listing_what_exists(tiny, examples, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny, examples, tmp_path, max_steps=4, eval_interval=1,
              callbacks=[EarlyStopping(monitor="eval/los", patience=1)])
    msgs = [str(w.message) for w in caught if "eval/los'" in str(w.message)]
    assert len(msgs) == 1 and "eval/loss" in msgs[0] and "EarlyStopping" in msgs[0]


def test_strict_monitors_raise(tiny, examples, tmp_path):
    with pytest.raises(ValueError, match="'lss'.*metrics that exist: .*loss"):
        train(tiny, examples, tmp_path / "a", max_steps=2, log_interval=1,
              callbacks=[EarlyStopping(monitor="lss", strict=True)])
    with pytest.raises(ValueError, match="Checkpoint monitors 'eval/acc'"):
        train(tiny, examples, tmp_path / "b", max_steps=2,
              callbacks=[Checkpoint(tmp_path / "b" / "ck", interval=None, monitor="eval/acc", strict=True)])
