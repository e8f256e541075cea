"""TensorBoardLogger and WandbLogger: read what they wrote back from disk and compare it with
``result.history``."""

import json
import math
import struct
from pathlib import Path

import pytest

from lazarus import State
from lazarus.callbacks import TensorBoardLogger, WandbLogger
from lazarus.data import SFTDataset
from lazarus.training import SFTConfig, SFTTrainer

REQUIRED_TB_TAGS = {"train/loss", "train/lr", "train/tokens_per_second", "train/peak_memory_gb", "eval/loss"}


# --------------------------------------------------------------------------- readers
def _tfrecords(path):
    """Payloads of a TFRecord file (u64 length, u32 crc, data, u32 crc per record)."""
    data = Path(path).read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[pos: pos + 8])
        yield data[pos + 12: pos + 12 + n]
        pos += 12 + n + 4


def read_tb_scalars(log_dir):
    """``{tag: {step: value}}`` as TensorBoard would show it: event files are read in time
    order and a ``SessionLog.START`` at step S (a resume) drops earlier points at steps >= S."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    files = sorted(Path(log_dir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    assert files, f"no event files in {log_dir}"
    scalars: dict[str, dict[int, float]] = {}
    texts: dict[str, str] = {}
    for f in files:
        for payload in _tfrecords(f):
            ev = Event()
            ev.ParseFromString(payload)
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                for points in scalars.values():
                    for s in [s for s in points if s >= ev.step]:
                        del points[s]
            if not ev.HasField("summary"):
                continue
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    points = scalars.setdefault(v.tag, {})
                    # TensorBoard would draw a second point at the same step (a zigzag)
                    assert ev.step not in points, f"{v.tag} logged twice at step {ev.step}"
                    points[ev.step] = v.simple_value
                elif v.HasField("tensor") and v.tensor.string_val:
                    texts[v.tag] = v.tensor.string_val[0].decode()
    return scalars, texts


def _wandb_records(path):
    """Protobuf records of a W&B ``.wandb`` transaction log (LevelDB log framing: 32 KiB blocks,
    7-byte record headers ``crc32 | length u16 | type``; FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        n = int.from_bytes(data[pos + 4: pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7: pos + 7 + n]
        pos += 7 + n
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def read_wandb_run(run_file):
    """(run id, config dict, list of history rows) of one offline run file."""
    run_id, config, history = None, {}, []
    for rec in _wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update if i.key != "_wandb"})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update if i.key != "_wandb"})
        elif kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return run_id, config, history


def wandb_run_files(wandb_dir):
    return sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime_ns)


# --------------------------------------------------------------------------- helpers
def _train(tiny, examples, tmp_path, callbacks, resume_from=None, max_steps=6, **cfg):
    model, tok = tiny
    config = SFTConfig(max_steps=max_steps, batch_size=8, learning_rate=1e-3, warmup_steps=2, log_interval=2,
                       eval_interval=3, checkpoint_interval=cfg.pop("checkpoint_interval", None),
                       checkpoint_dir=str(tmp_path / "ckpt"), seed=0, **cfg)
    trainer = SFTTrainer(model, tok, config, callbacks=callbacks)
    train = SFTDataset(examples / "sft_train.jsonl", tok)
    evald = SFTDataset(examples / "sft_eval.jsonl", tok)
    return trainer.train(train, eval_dataset=evald, resume_from=resume_from)


def _train_rows(history):
    return [h for h in history if "loss" in h]


def _eval_rows(history):
    return [h for h in history if "eval/loss" in h]


# --------------------------------------------------------------------------- TensorBoard
def test_tensorboard_tags_and_values_match_history(tiny, examples, tmp_path):
    runs = tmp_path / "runs"
    result = _train(tiny, examples, tmp_path, [TensorBoardLogger(runs)])
    scalars, texts = read_tb_scalars(runs)

    assert REQUIRED_TB_TAGS <= set(scalars), sorted(scalars)
    train_rows, eval_rows = _train_rows(result.history), _eval_rows(result.history)
    assert [h["step"] for h in train_rows] == [2, 4, 6]
    assert [h["step"] for h in eval_rows] == [3, 6]
    for row in train_rows:
        for key, value in row.items():
            if key == "step" or not math.isfinite(value):
                continue
            got = scalars[f"train/{key}"][row["step"]]
            assert got == pytest.approx(value, rel=1e-6, abs=1e-12), (key, row["step"])
    for row in eval_rows:
        assert scalars["eval/loss"][row["step"]] == pytest.approx(row["eval/loss"], rel=1e-6)
    # every logged point is in history (nothing extra)
    assert sorted(scalars["train/loss"]) == [2, 4, 6]
    assert sorted(scalars["eval/loss"]) == [3, 6]
    # the eval loss is of the current weights, not a stale copy
    assert eval_rows[0]["eval/loss"] != eval_rows[1]["eval/loss"]
    # hyper-parameters as text, and what trains (parameter counts, precision, LoRA, data size)
    assert "learning_rate: 0.001" in texts.get("hparams/text_summary", "")
    info = result.state.run_info
    run_text = texts.get("run_info/text_summary", "")
    assert f"({info['trainable_parameters'] / 1e6:.3f}M/{info['total_parameters'] / 1e6:.3f}M)" in run_text
    assert "computes in float32" in run_text and f"{info['examples']:,} examples" in run_text


def test_tensorboard_resume_continues_curve_without_duplicates(tiny_dir, examples, tmp_path):
    from lazarus.models import load_model

    runs = tmp_path / "runs"
    full = _train(load_model(tiny_dir), examples, tmp_path, [TensorBoardLogger(runs)], checkpoint_interval=2)
    straight, _ = read_tb_scalars(runs)
    # resume from step 2 into the same log dir: the interrupted run's points after step 2 are purged
    resumed = _train(load_model(tiny_dir), examples, tmp_path, [TensorBoardLogger(runs)],
                     resume_from=tmp_path / "ckpt" / "step_2.safetensors")
    assert len(list(runs.glob("events.out.tfevents.*"))) == 2  # second writer did not overwrite the first
    after, _ = read_tb_scalars(runs)
    assert sorted(after["train/loss"]) == [2, 4, 6]
    for row in _train_rows(resumed.history):
        assert after["train/loss"][row["step"]] == pytest.approx(row["loss"], rel=1e-6)
    # exact resume: the resumed curve equals the straight one
    for step in (2, 4, 6):
        assert after["train/loss"][step] == pytest.approx(straight["train/loss"][step], rel=1e-5)
    assert [h["step"] for h in _train_rows(full.history)] == [2, 4, 6]


def test_tensorboard_only_rank0_writes(tmp_path):
    cb = TensorBoardLogger(tmp_path / "runs")
    st = State(rank=1, world_size=2)
    cb.on_fit_start(st)
    st.logged = {"loss": 1.0}
    cb.on_log(st)
    cb.on_fit_end(st)
    assert cb.writer is None
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- Weights & Biases (offline)
@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def test_wandb_offline_metrics_and_config(tiny, examples, tmp_path, wandb_offline):
    logger = WandbLogger(project="lazarus-tests", dir=str(tmp_path))
    result = _train(tiny, examples, tmp_path, [logger])
    files = wandb_run_files(tmp_path)
    assert len(files) == 1
    run_id, config, rows = read_wandb_run(files[0])
    assert run_id == logger.run_id

    assert config["learning_rate"] == 1e-3
    assert config["batch_size"] == 8
    assert config["max_steps"] == 6
    assert config["mask_prompt"] is True
    assert config["run/trainable_parameters"] == result.state.run_info["trainable_parameters"] > 0
    assert config["run/precision"].startswith("computes in float32")

    train_logged = [r for r in rows if "train/loss" in r]
    eval_logged = [r for r in rows if "eval/loss" in r]
    assert [r["trainer/step"] for r in train_logged] == [2, 4, 6]
    assert [r["trainer/step"] for r in eval_logged] == [3, 6]
    for row, logged in zip(_train_rows(result.history), train_logged):
        for key in ("loss", "lr", "tokens_per_second", "peak_memory_gb", "grad_norm"):
            assert logged[f"train/{key}"] == pytest.approx(row[key], rel=1e-9), key
    for row, logged in zip(_eval_rows(result.history), eval_logged):
        assert logged["eval/loss"] == pytest.approx(row["eval/loss"], rel=1e-9)


def test_wandb_resume_continues_same_run(tiny_dir, examples, tmp_path, wandb_offline, capfd):
    from lazarus.models import load_model

    first = WandbLogger(project="lazarus-tests", dir=str(tmp_path))
    _train(load_model(tiny_dir), examples, tmp_path, [first], max_steps=4, checkpoint_interval=2)
    second = WandbLogger(project="lazarus-tests", dir=str(tmp_path))  # no id given: it comes from the checkpoint
    resumed = _train(load_model(tiny_dir), examples, tmp_path, [second], max_steps=6,
                     resume_from=tmp_path / "ckpt" / "step_4.safetensors")
    assert second.run_id == first.run_id
    files = wandb_run_files(tmp_path)
    assert len(files) == 2
    ids = [read_wandb_run(f)[0] for f in files]
    assert ids == [first.run_id, first.run_id]
    _, _, rows = read_wandb_run(files[-1])
    steps = [r["trainer/step"] for r in rows if "trainer/step" in r]
    # only what happened after the checkpoint, in increasing order
    assert steps == sorted(steps) and min(steps) > 4
    assert [r["trainer/step"] for r in rows if "train/loss" in r] == [6]
    resumed_rows = [h for h in _train_rows(resumed.history) if h["step"] > 4]
    assert [r["train/loss"] for r in rows if "train/loss" in r] == pytest.approx([h["loss"] for h in resumed_rows])
    out = capfd.readouterr()
    assert "monoton" not in (out.out + out.err).lower()
    assert "step must" not in (out.out + out.err).lower()


def test_wandb_only_rank0_logs(tmp_path, wandb_offline):
    cb = WandbLogger(project="lazarus-tests", dir=str(tmp_path))
    st = State(rank=1, world_size=2)
    cb.on_fit_start(st)
    st.logged = {"loss": 1.0}
    cb.on_log(st)
    cb.on_fit_end(st)
    assert cb.run is None
    assert not (tmp_path / "wandb").exists()
