"""The resume state of a run: what a checkpoint holds beside the weights so that N steps straight and
K steps + resume to N give the same losses and weights.

:func:`resume_payload` collects it from a Loop as (arrays, JSON document): optimizer arrays, the RNG
states, loop counters and history, the interval averages so far, every stateful callback's
``state_dict()``, buffered rollout batches, the data order and a digest of the data, and the
trainer's own arrays (e.g. DPO's reference cache). :func:`restore` puts it back and refuses a
resume that would silently change the run (:func:`check_same_config`). The files themselves are
written and verified by :mod:`lazarus.checkpointing`."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from lazarus import checkpointing as ckpt
from lazarus.protocols import ResumableBatchSource
from lazarus.rng import rng_state, set_rng_state
from lazarus.step import set_optimizer_state


def config_dict(config) -> dict | None:
    dump = getattr(config, "model_dump", None)
    return dump(mode="json") if dump is not None else None


def resume_payload(loop) -> tuple[dict, dict]:
    """(arrays, JSON document) that restore ``loop``'s run exactly."""
    st = loop.state
    arrays = {f"optimizer.{k}": v for k, v in tree_flatten(loop.optimizer.state)}
    arrays["rng.mlx"], rng_doc = rng_state()
    doc: dict[str, Any] = {
        "step": st.step, "epoch": st.epoch, "micro_step": st.micro_step,
        "batch_in_epoch": st.batch_in_epoch, "tokens_seen": st.tokens_seen,
        "epoch_open": loop.epoch_open, "history": st.history, "world_size": loop.ranks.size,
        "stop_reason": None, "config": config_dict(st.config), "rng": rng_doc,
        "callbacks": {cb.state_key: cb.state_dict() for cb in loop.callbacks if cb.state_dict()},
        "pending": [], "interval": loop.interval.state_dict(),
    }
    for i, (batch, metrics) in enumerate(loop.pending):
        meta = {}
        for k, v in batch.items():
            if isinstance(v, mx.array):
                arrays[f"pending.{i}.{k}"] = v
            else:
                meta[k] = v
        doc["pending"].append({"batch": meta, "metrics": metrics})
    if isinstance(loop.train_data, ResumableBatchSource):
        doc["data"] = loop.train_data.state_dict()
    t_arrays, doc["trainer"] = loop.hooks.resume_state()
    arrays.update({f"trainer.{k}": v for k, v in t_arrays.items()})
    return arrays, doc


def restore(loop, path) -> None:
    """Load the checkpoint at ``path`` into ``loop``: weights, optimizer, RNGs, counters, callbacks,
    data position, buffered rollouts and the trainer's state."""
    st = loop.state
    weights, arrays, doc = ckpt.read_checkpoint(path)
    check_same_config(path, doc.get("config"), st.config)
    ckpt.check_compatible(path, weights, st.trainable_weights())
    if doc.get("world_size", 1) != loop.ranks.size and doc.get("pending"):
        raise ckpt.CheckpointError(f"{path}: saved with {doc['world_size']} ranks mid-rollout; "
                                   f"resume it with the same number of ranks")
    current = st.trainable_weights()
    masters = {k[len("master."):]: v for k, v in arrays.items() if k.startswith("master.")}
    loop.model.load_weights([(k, masters.get(k, v).astype(current[k].dtype)) for k, v in weights.items()],
                            strict=False)
    set_optimizer_state(loop.optimizer, [(k[len("optimizer."):], v) for k, v in arrays.items()
                                         if k.startswith("optimizer.")])
    set_rng_state(arrays["rng.mlx"], doc["rng"])
    st.step, st.epoch, st.micro_step = doc["step"], doc["epoch"], doc["micro_step"]
    st.batch_in_epoch, st.tokens_seen = doc["batch_in_epoch"], doc["tokens_seen"]
    st.history = list(doc["history"])
    loop.epoch_open = doc["epoch_open"]
    loop.interval.load_state_dict(doc["interval"])
    states = doc.get("callbacks", {})
    for cb in loop.callbacks:
        if cb.state_key in states:
            cb.load_state_dict(states[cb.state_key])
    if "data" in doc and isinstance(loop.train_data, ResumableBatchSource):
        loop.train_data.load_state_dict(doc["data"], source=str(path))
    loop.pending = []
    for i, saved in enumerate(doc.get("pending", [])):
        saved = saved if "batch" in saved else {"batch": saved, "metrics": {}}  # written before 0.x: no metrics
        batch = dict(saved["batch"])
        prefix = f"pending.{i}."
        batch.update({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        loop.pending.append((batch, dict(saved["metrics"])))
    loop.hooks.load_resume_state({k[len("trainer."):]: v for k, v in arrays.items() if k.startswith("trainer.")},
                                 doc.get("trainer") or {})
    st.extras["resumed_from"] = str(path)


def master_copies(training: dict, saved: dict) -> dict:
    """``master.<name>`` arrays for the weights whose saved copy changed dtype (a bf16 model trained
    in float32 saves bf16 weights): the state file keeps the training copy, so resuming is exact."""
    return {f"master.{k}": v for k, v in training.items() if saved[k].dtype != v.dtype}


def check_same_config(path, saved: dict | None, config) -> None:
    """Refuse to resume with settings that change the trajectory (``learning_rate``, ``batch_size``,
    ``dpo.beta`` ...): the resumed run would silently differ from what its checkpoint and its
    config.yaml say. Fields in the config class's ``RESUME_MAY_CHANGE`` (how long to train, what
    to write, how fast to compute) may differ."""
    now = config_dict(config)
    if saved is None or now is None:
        return
    allowed = getattr(config, "RESUME_MAY_CHANGE", frozenset())

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old, new = flat(saved), flat(now)
    changed = [k for k in new if k in old and k not in allowed and old[k] != new[k]]
    if changed:
        diffs = "; ".join(f"{k} is {new[k]!r} now but {old[k]!r} in the checkpoint" for k in changed)
        raise ckpt.CheckpointError(
            f"{path}: resuming would silently change the run: {diffs}. Resume with the checkpoint's settings "
            "(its run folder's config.yaml), or start a new run")
