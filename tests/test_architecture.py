"""The house rules of docs/architecture.md, checked: declared protocols, the event enum, State as the
only door callbacks use, rollout metrics and eval steps through the Loop, file sizes, no import circle."""

import ast
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

import lazarus
from lazarus import Loop, State
from lazarus.callbacks import EVENTS, Callback, Event
from lazarus.data import DataLoader
from lazarus.protocols import (BatchSource, DefaultHooks, DistributedBatchSource, PaddingReport,
                               ResumableBatchSource, Rollout, ShardedBatchSource)
from lazarus.training import SFTTrainer

PACKAGE = Path(lazarus.__file__).parent


class Pairs:
    """The smallest batch source a user writes: __len__ and get_batch, nothing else."""

    def __init__(self, n=4):
        r = np.random.RandomState(0)
        self.x = r.randn(n, 8, 3).astype(np.float32)

    def __len__(self):
        return len(self.x)

    def get_batch(self, epoch, i):
        x = mx.array(self.x[i])
        return {"x": x, "y": x.sum(-1), "num_tokens": 8}


def mse(model, batch):
    err = model(batch["x"]).squeeze(-1) - batch["y"]
    return (err * err).mean(), {}


def linear_loop(**kw):
    mx.random.seed(0)
    return Loop(nn.Linear(3, 1), optim.SGD(learning_rate=0.1), mse, kw.pop("data", Pairs()),
                handle_signals=False, **kw)


def test_events_are_an_enum_and_a_typo_fails_loudly():
    assert EVENTS == tuple(e.value for e in Event) and Event("step_end") is Event.STEP_END
    assert all(hasattr(Callback, e.handler) for e in Event)
    loop = linear_loop(max_steps=1)
    with pytest.raises(ValueError, match="step_ned"):
        loop.emit("step_ned")


def test_a_minimal_batch_source_trains_and_optional_capabilities_are_declared():
    data = Pairs()
    assert isinstance(data, BatchSource)
    assert not isinstance(data, (ShardedBatchSource, ResumableBatchSource, DistributedBatchSource, PaddingReport))
    loop = linear_loop(data=data, max_steps=8, log_interval=4)
    first = None
    result = loop.fit()
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first and loop.cpu_streams == 1  # no get_batch_shards: one stream
    loader = DataLoader(list(range(8)), 2, collate_fn=lambda idx, pad_multiple=8: {"i": mx.array(idx)})
    assert all(isinstance(loader, p) for p in (BatchSource, ShardedBatchSource, ResumableBatchSource,
                                               DistributedBatchSource))


def test_trainer_hooks_are_checked_up_front():
    with pytest.raises(TypeError, match="lacks steps_per_rollout, derived_metrics"):
        linear_loop(max_steps=1, trainer=object())
    assert issubclass(SFTTrainer, DefaultHooks)
    linear_loop(max_steps=1, trainer=DefaultHooks()).fit()


def test_callbacks_act_through_state_not_the_loop():
    assert "loop" not in State.__dataclass_fields__
    with pytest.raises(RuntimeError, match="once Loop.fit has started"):
        State().save_checkpoint("x.safetensors")

    class SaveAtStep2(Callback):
        def on_step_end(self, state):
            if state.step + 1 == 2:
                self.path = state.save_checkpoint(self.dir / "mine.safetensors")

    import tempfile
    cb = SaveAtStep2()
    cb.dir = Path(tempfile.mkdtemp())
    linear_loop(max_steps=3, callbacks=[cb]).fit()
    assert cb.path == cb.dir / "mine.safetensors" and cb.path.exists()


def test_rollout_metrics_are_logged_with_every_step_they_feed():
    calls = []

    def rollout(state, prompts):
        calls.append(state.step)
        reward = float(len(calls))
        return Rollout([prompts, prompts], {"reward": reward})

    loop = linear_loop(rollout=rollout, num_epochs=1, log_interval=1)
    result = loop.fit()
    rewards = [h["reward"] for h in result.history]
    assert rewards == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0] and calls == [0, 2, 4, 6]
    assert not any(k.startswith("log/") for h in result.history for k in h)


def test_eval_step_replaces_the_eval_loss_and_is_a_weighted_mean():
    def eval_step(batch):
        return {"reward": float(batch["x"].shape[0]) * 0 + float(batch["i"])}, float(batch["i"]) + 1

    class Indexed(Pairs):
        def get_batch(self, epoch, i):
            return {**super().get_batch(epoch, i), "i": i}

    loop = linear_loop(max_steps=1, eval_data=Indexed(), eval_step=eval_step)
    metrics = loop.evaluate()
    # weights 1,2,3,4 on rewards 0,1,2,3: (0 + 2 + 6 + 12) / 10
    assert metrics == pytest.approx({"reward": 2.0}) and "loss" not in metrics


def _top_level_imports(path: Path, modules) -> set[str]:
    """The lazarus modules ``path`` imports at module level (imports inside functions are deliberate
    lazy imports), each resolved to the most specific module: ``from lazarus import rng`` is ``lazarus.rng``."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lazarus"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            out.update(n if n in modules else node.module for n in names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
    return out


def test_no_import_circle_and_rooms_stay_small():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("lazarus",) + path.relative_to(PACKAGE).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {m: _top_level_imports(p, modules) - {m} for m, p in modules.items()}
    done, path, circles = set(), [], []

    def visit(m):
        if m in path:
            circles.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert circles == []
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in modules.values()}
    assert max(sizes.values()) < 450, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    source = (PACKAGE / "loop.py").read_text().splitlines()
    start = next(i for i, line in enumerate(source) if line.startswith("class Loop"))
    assert len(source) - start <= 300
