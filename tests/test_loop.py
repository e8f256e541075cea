"""The Loop: events, requests, schedules, clipping, checkpoints, early stopping, NaN, resume."""

import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lazarus import Loop
from lazarus import checkpointing as ckpt
from lazarus.callbacks import (EVENTS, Callback, Checkpoint, EarlyStopping, GradientClipping, LRSchedule,
                               TerminateOnNaN)


class Regression:
    """A loader of a fixed linear-regression problem (deterministic per epoch)."""

    def __init__(self, n_batches=6, bs=4, seed=0, nan_batches=()):
        r = np.random.RandomState(seed)
        self.x = r.randn(n_batches * bs, 3).astype(np.float32)
        self.y = self.x @ np.array([1.0, -2.0, 3.0], dtype=np.float32)
        self.n, self.bs, self.nan_batches = n_batches, bs, set(nan_batches)

    def __len__(self):
        return self.n

    def get_batch(self, epoch, i):
        o = np.random.RandomState(epoch).permutation(self.n)[i]
        sl = slice(o * self.bs, (o + 1) * self.bs)
        y = self.y[sl].copy()
        if (epoch, i) in self.nan_batches:
            y[:] = np.nan
        return {"x": mx.array(self.x[sl]), "y": mx.array(y), "num_tokens": self.bs}


def mse(model, batch):
    pred = model(batch["x"]).squeeze(-1)
    loss = ((pred - batch["y"]) ** 2).mean()
    return loss, {"abs_err": mx.abs(pred - batch["y"]).mean()}


class Recorder(Callback):
    order = 60

    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_") and name[3:] in EVENTS:
            rec = object.__getattribute__(self, "events")
            return lambda state, _n=name[3:]: rec.append(_n)
        return object.__getattribute__(self, name)


def make_loop(callbacks=(), data=None, eval_data=None, lr=0.05, seed=0, **kw):
    mx.random.seed(seed)
    model = nn.Linear(3, 1)
    kw.setdefault("num_epochs", 2)
    return Loop(model, optim.SGD(learning_rate=lr), mse, data or Regression(), eval_data=eval_data,
                callbacks=list(callbacks), seed=seed, handle_signals=False, **kw)


def weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_event_order_two_epochs_with_eval():
    rec = Recorder()
    loop = make_loop([rec], data=Regression(n_batches=2), eval_data=Regression(n_batches=1, seed=1),
                     log_interval=2, eval_interval=2)
    loop.fit()
    step = ["step_start", "step_end"]
    epoch = ["epoch_start", *step, *step, "log", "eval_start", "eval_end", "epoch_end"]
    assert rec.events == ["fit_start", *epoch, *epoch, "fit_end"]


def test_before_optimizer_step_sees_grads_and_skip_keeps_weights():
    class SkipSecond(Callback):
        def __init__(self):
            self.norms = []

        def on_before_optimizer_step(self, state):
            self.norms.append(float(mx.sqrt(sum((g ** 2).sum() for _, g in tree_flatten(state.grads))).item()))
            if len(self.norms) == 2:
                state.skip_step("test skip")

    cb = SkipSecond()
    snapshots = []

    class Snap(Callback):
        order = 99

        def on_step_end(self, state):
            snapshots.append(weights(state.model))

    loop = make_loop([cb, Snap()], max_steps=3, num_epochs=None)
    before = weights(loop.model)
    loop.fit()
    assert len(cb.norms) == 4 and all(n > 0 for n in cb.norms)  # 3 steps + 1 skipped
    assert loop.state.step == 3
    # the skipped attempt (2nd) ended with weights identical to after step 1, then rolled back
    assert not np.allclose(before["weight"], snapshots[0]["weight"])
    np.testing.assert_array_equal(snapshots[0]["weight"], snapshots[1]["weight"])
    assert loop.state.extras["skipped_steps"][0][1] == "test skip"


def test_requests_stop_eval_checkpoint(tmp_path):
    class Requester(Callback):
        def on_step_end(self, state):
            if state.step + 1 == 2:
                state.request_eval()
                state.request_checkpoint()
            if state.step + 1 == 3:
                state.request_stop("enough")
                state.request_stop("second reason is ignored")

    rec = Recorder()
    loop = make_loop([Requester(), rec, Checkpoint(tmp_path, interval=None, save_best=False, save_final=False)],
                     eval_data=Regression(n_batches=1, seed=3), num_epochs=10)
    result = loop.fit()
    assert result.stop_reason == "enough"
    assert loop.state.step == 3
    # the requested evaluation, and (an eval set without eval_interval) one at the end of the run
    assert rec.events.count("eval_end") == 2 and rec.events.count("checkpoint") == 1
    assert (tmp_path / "step_2.safetensors").exists()
    assert [h["step"] for h in result.history if "eval/loss" in h] == [2, 3]


def test_lr_schedule_values_at_chosen_steps():
    sched = LRSchedule(warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    loop = make_loop([sched], lr=0.1, max_steps=12, num_epochs=None, log_interval=1)
    result = loop.fit()
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(0.1 * 1 / 4, rel=1e-5)
    assert lrs[3] == pytest.approx(0.1, rel=1e-5)  # warmup done
    # cosine from step 4 to 12 down to 10% of base
    p = (8 - 4) / 8
    assert lrs[8] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))), rel=1e-5)
    assert lrs[11] < lrs[8] < lrs[4]
    for k in (0, 5, 11):
        assert sched.lr_at(k).item() == pytest.approx(lrs[k], rel=1e-6)
    lin = LRSchedule(warmup_steps=0, decay="linear", total_steps=10, base_lr=1.0)
    assert lin.lr_at(5).item() == pytest.approx(0.5)
    assert LRSchedule(warmup_steps=3, base_lr=2.0).lr_at(100).item() == pytest.approx(2.0)


def test_gradient_clipping_bounds_the_update_and_reports_norm():
    data = Regression()
    data.y *= 100  # huge gradients
    loop = make_loop([GradientClipping(max_norm=0.5)], data=data, lr=1.0, max_steps=1, num_epochs=None,
                     log_interval=1)
    w0 = weights(loop.model)
    # expected unclipped norm from an independent computation
    batch = data.get_batch(0, 0)
    _, grads = nn.value_and_grad(loop.model, mse)(loop.model, {k: batch[k] for k in ("x", "y")})
    true_norm = math.sqrt(sum(float((g ** 2).sum().item()) for _, g in tree_flatten(grads)))
    result = loop.fit()
    w1 = weights(loop.model)
    step_norm = math.sqrt(sum(((w1[k] - w0[k]) ** 2).sum() for k in w0))
    assert step_norm == pytest.approx(0.5, rel=1e-4)  # SGD lr=1: update == clipped grad
    assert result.history[0]["grad_norm"] == pytest.approx(true_norm, rel=1e-4)


def test_checkpoint_files_and_best_selection(tmp_path):
    class FakeMetric(Callback):
        """Makes the monitored 'score' peak at step 4."""
        order = 45

        def on_log(self, state):
            state.logged["score"] = -abs(state.step - 6)

    ck = Checkpoint(tmp_path, interval=3, monitor="score", keep_last=2)
    best_weights = {}

    class Grab(Callback):
        order = 95

        def on_log(self, state):
            if state.step == 6:
                best_weights.update(weights(state.model))

    loop = make_loop([FakeMetric(), ck, Grab()], max_steps=9, num_epochs=None, log_interval=1)
    loop.fit()
    names = sorted(p.name for p in tmp_path.glob("*.safetensors") if ".state." not in p.name)
    assert names == ["best.safetensors", "final.safetensors", "step_6.safetensors", "step_9.safetensors"]
    assert len(list(tmp_path.glob("*.state.safetensors"))) == 4  # one per checkpoint, no orphans
    assert ck.best_step == 6 and ck.mode == "max"  # a training metric is judged at each checkpoint
    saved, _ = ckpt.read_weights(tmp_path / "best.safetensors")
    np.testing.assert_array_equal(np.array(saved["weight"]), best_weights["weight"])
    final, _ = ckpt.read_weights(tmp_path / "final.safetensors")
    np.testing.assert_array_equal(np.array(final["weight"]), weights(loop.model)["weight"])


def test_early_stopping_patience_and_threshold():
    class Plateau(Callback):
        order = 45

        def on_log(self, state):
            state.logged["metric_x"] = 1.0 if state.step > 2 else 5.0 - state.step

    es = EarlyStopping(monitor="metric_x", patience=3)
    result = make_loop([Plateau(), es], max_steps=50, num_epochs=None, log_interval=1).fit()
    assert result.state.step == 6  # best (1.0) first seen at step 3, then 3 checks without improvement
    assert "did not improve for 3" in result.stop_reason

    class Margin(Callback):
        order = 45

        def on_log(self, state):
            state.logged["rewards/margins"] = 0.5 * state.step

    es2 = EarlyStopping(target_reward_margin=2.0)
    result = make_loop([Margin(), es2], max_steps=50, num_epochs=None, log_interval=1).fit()
    assert result.state.step == 4
    assert "target_reward_margin reached" in result.stop_reason and "rewards/margins=2" in result.stop_reason


def test_nan_steps_are_skipped_and_stop_after_consecutive():
    data = Regression(n_batches=6, nan_batches={(0, 1)})
    loop = make_loop([TerminateOnNaN(max_consecutive=2)], data=data, num_epochs=1, log_interval=1)
    result = loop.fit()
    assert result.stop_reason == "completed 1 epochs"
    assert loop.state.step == 5  # one of six batches was skipped
    assert all(np.isfinite(v).all() for v in weights(loop.model).values())
    assert all(math.isfinite(h["loss"]) for h in result.history if "loss" in h)

    data = Regression(n_batches=6, nan_batches={(0, 2), (0, 3), (0, 4)})
    result = make_loop([TerminateOnNaN(max_consecutive=2)], data=data, num_epochs=1).fit()
    assert "non-finite for 2 consecutive steps" in result.stop_reason
    assert result.state.step == 2


class Counter(Callback):
    """A stateful callback: counts steps; its state must survive resume."""

    def __init__(self):
        self.count = 0
        self.seen = []

    def on_step_end(self, state):
        self.count += 1
        self.seen.append(round(state.metrics["loss"], 6))

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, d):
        self.count = d["count"]


def test_exact_resume_matches_straight_run(tmp_path):
    class StopAt(Callback):
        def __init__(self, n):
            self.n = n

        def on_step_end(self, state):
            if state.step + 1 == self.n:
                state.request_stop("interrupted for the test")

    def run(stop_at, resume=None, dirname="a"):
        counter = Counter()
        cbs = [StopAt(stop_at), LRSchedule(2, "cosine"), GradientClipping(1.0), counter, TerminateOnNaN(),
               Checkpoint(tmp_path / dirname, interval=4), EarlyStopping(monitor="loss", patience=100)]
        loop = make_loop(cbs, data=Regression(n_batches=5), max_steps=10, num_epochs=None, log_interval=3,
                         grad_accumulation_steps=2)
        # dropout-like randomness in the objective to check the MLX RNG is restored
        base = loop.compute_loss
        loop.compute_loss = lambda m, b: (lambda l, met: (l + 1e-3 * mx.random.uniform(), met))(*base(m, b))
        result = loop.fit(resume_from=resume)
        return loop, counter, result

    straight, c1, r1 = run(None)
    _, _, _ = run(4, dirname="b")
    resumed, c2, r2 = run(None, resume=tmp_path / "b" / "step_4.safetensors", dirname="b")
    w1, w2 = weights(straight.model), weights(resumed.model)
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k])
    assert c1.seen[4:] == c2.seen
    assert c2.count == 10
    losses1 = [h["loss"] for h in r1.history if "loss" in h]
    losses2 = [h["loss"] for h in r2.history if "loss" in h]
    assert losses1 == losses2


def test_resume_refuses_incompatible_model(tmp_path):
    loop = make_loop([Checkpoint(tmp_path, interval=2)], max_steps=2, num_epochs=None)
    loop.fit()
    other = Loop(nn.Linear(4, 1), optim.SGD(learning_rate=0.1), mse, Regression(), max_steps=3,
                 handle_signals=False)
    with pytest.raises(ckpt.CheckpointError, match="does not match this model.*shape"):
        other.fit(resume_from=tmp_path / "step_2.safetensors")


WRITER = textwrap.dedent("""
    import sys, lazarus, mlx.core as mx
    from lazarus.checkpointing import write_checkpoint
    d = sys.argv[1]
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        w = {"w": mx.full((256, 256), float(i))}
        s = {"opt": mx.full((256, 256), float(i))}
        write_checkpoint(f"{d}/step_{i % 3}.safetensors", w, s, {"i": i})
        write_checkpoint(f"{d}/best.safetensors", w, s, {"i": i})
""")


def test_killed_writer_leaves_complete_checkpoints(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for f in tmp_path.glob("*.safetensors"):
            if ".state." in f.name or f.name.startswith("."):
                continue
            w, s, doc = ckpt.read_checkpoint(f)  # complete: weights + matching state
            assert float(w["w"][0, 0].item()) == doc["i"] == float(s["opt"][0, 0].item())


SIGINT_SCRIPT = textwrap.dedent("""
    import sys, time, lazarus, mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
    sys.path.insert(0, sys.argv[2])
    from test_loop import Regression, mse
    from lazarus import Loop
    from lazarus.callbacks import Callback, Checkpoint

    class Slow(Callback):
        def on_step_end(self, state):
            if state.step == 2:
                print("training", flush=True)
            time.sleep(0.05)

    resume = sys.argv[3] if len(sys.argv) > 3 else None
    loop = Loop(nn.Linear(3, 1), optim.SGD(learning_rate=0.05), mse, Regression(), num_epochs=1000,
                callbacks=[Slow(), Checkpoint(sys.argv[1], interval=None, save_final=False, save_best=False)])
    r = loop.fit(resume_from=resume)
    print("STOP", r.stop_reason, loop.state.step, flush=True)
""")


def test_sigint_writes_resumable_checkpoint(tmp_path):
    script = tmp_path / "sig.py"
    script.write_text(SIGINT_SCRIPT)
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck"), tests_dir],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "training"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "interrupted by SIGINT" in out
    step = int(out.split()[-1])
    path = tmp_path / "ck" / f"step_{step}.safetensors"
    assert path.exists()
    _, _, doc = ckpt.read_checkpoint(path)
    assert doc["step"] == step


def test_a_step_end_skip_without_may_skip_steps_is_an_error_not_a_silent_update():
    class SkipAtStepEnd(Callback):  # forgets may_skip_steps = True: no rollback copy is kept
        def on_step_end(self, state):
            state.skip_step("no rollback")

    with pytest.raises(RuntimeError, match="may_skip_steps"):
        make_loop([SkipAtStepEnd()], max_steps=1, num_epochs=None).fit()


def test_evaluation_runs_in_eval_mode_and_restores_the_mode():
    class Dropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(3, 1), nn.Dropout(0.5)

        def __call__(self, x):
            return self.lin(self.drop(x))

    mx.random.seed(0)
    model = Dropout()
    loop = Loop(model, optim.SGD(learning_rate=0.0), mse, Regression(), eval_data=Regression(n_batches=2, seed=1),
                handle_signals=False, max_steps=1)
    data = Regression(n_batches=2, seed=1)
    model.eval()
    want = np.mean([mse(model, {k: v for k, v in data.get_batch(0, i).items() if k != "num_tokens"})[0].item()
                    for i in range(2)])
    model.train()
    got = loop.evaluate()["loss"]
    assert model.training and got == pytest.approx(want, rel=1e-5)  # evaluated without dropout


def test_interval_rates_after_a_resume_count_only_the_steps_since_it():
    """A run stopped mid-interval keeps its sums (the averages go on), but the rates divide only what
    happened after the resume by the time measured after it."""
    from lazarus.interval_metrics import IntervalMetrics

    before = IntervalMetrics()
    for v in (1.0, 2.0, 3.0):
        before.add_step({"loss": v})
    after = IntervalMetrics()
    after.load_state_dict(before.state_dict())
    after.restart_clock()
    after.add_tokens(10)
    after.add_step({"loss": 6.0})
    time.sleep(0.05)
    logged = after.take()
    assert logged["loss"] == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4
    assert 0 < logged["steps_per_second"] <= 1 / 0.05 and logged["tokens_per_second"] == pytest.approx(
        10 * logged["steps_per_second"])
