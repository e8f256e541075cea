"""What Lazarus promises (docs/checkpoints.md): runs never mix or get lost, broken weights are never
saved, exit codes tell the truth, no input crashes the process, resume never silently changes the run,
model folders are data. One test (at least) per promise; the distributed ones are in test_distributed.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import yaml

from conftest import write_jsonl
from test_cli import _write
from lazarus import Loop
from lazarus import checkpointing as ckpt
from lazarus.callbacks import Checkpoint, TerminateOnNaN
from lazarus.cli import main
from conftest import run_cli as cli

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "lazarus" / "data" / "examples" / "sft_train.jsonl"


def sft(tiny_dir, out, *extra, data=TRAIN):
    return ["train", "sft", "--model", tiny_dir, "--data", data, "--output", out, "--set", "warmup_steps=0",
            "--set", "progress_bar=false", *extra]


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def all_checkpoints_finite(folder):
    for name in ckpt.list_checkpoints(folder):
        weights, arrays, _ = ckpt.read_checkpoint(Path(folder) / name)
        assert ckpt.first_non_finite(weights) is None, name
        assert ckpt.first_non_finite({k: v for k, v in arrays.items() if k.startswith("optimizer.")}) is None, name


# ------------------------------------------------------------------ 1. a new run never mixes with an old one
def test_rerun_into_a_used_output_folder_is_refused_and_overwrite_clears_it(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 2, "--set", "checkpoint_interval=1"))
    assert rc == 0, err
    before = {p: p.read_bytes() for p in (out / "checkpoints").glob("*.safetensors")}
    rc, _, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 3))
    line = one_line(err)
    assert rc == 2 and "already holds a run" in line
    assert f"--resume {out / 'checkpoints' / 'step_2.safetensors'}" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in (out / "checkpoints").glob("*.safetensors")} == before  # untouched
    rc, _, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 3, "--overwrite"))
    assert rc == 0, err
    assert ckpt.list_checkpoints(out / "checkpoints") == ["final.safetensors"]  # nothing of the first run left
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 3
    # --overwrite only ever clears a Lazarus run folder
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    rc, _, err = cli(capsys, *sft(tiny_dir, other, "--max-steps", 1, "--overwrite"))
    assert rc == 2 and "not a Lazarus run folder" in one_line(err)
    assert (other / "thesis.txt").read_text() == "precious"


def test_overwrite_clears_only_checkpoints_in_a_checkpoint_folder_outside_the_run(tiny_dir, tmp_path, capsys):
    out, shared = tmp_path / "run", tmp_path / "models"
    args = ("--max-steps", 2, "--set", "checkpoint_interval=1", "--set", f"checkpoint_dir={shared}")
    rc, _, err = cli(capsys, *sft(tiny_dir, out, *args))
    assert rc == 0, err
    assert "step_1.safetensors" in ckpt.list_checkpoints(shared)
    (shared / "readme.txt").write_text("other files live here")  # the user keeps other files beside them
    rc, _, err = cli(capsys, *sft(tiny_dir, out, *args, "--overwrite"))
    assert rc == 0, err
    assert (shared / "readme.txt").read_text() == "other files live here"
    assert set(ckpt.list_checkpoints(shared)) == {f"{n}.safetensors" for n in ("step_1", "step_2", "best", "final")}


def regression_loop(callbacks, lr=0.05, **kw):
    from test_loop import Regression, mse

    mx.random.seed(0)
    kw.setdefault("max_steps", 6)
    return Loop(nn.Linear(3, 1), optim.SGD(learning_rate=lr), mse, Regression(), callbacks=callbacks,
                num_epochs=None, handle_signals=False, **kw)


def test_keep_last_prunes_only_files_this_run_wrote(tmp_path):
    regression_loop([Checkpoint(tmp_path, interval=1, save_best=False)], max_steps=3).fit()
    assert ckpt.list_checkpoints(tmp_path) == ["step_1.safetensors", "step_2.safetensors", "step_3.safetensors",
                                               "final.safetensors"]
    with pytest.warns(UserWarning, match="already holds checkpoints of another run"):
        regression_loop([Checkpoint(tmp_path, interval=5, keep_last=1, save_best=False)], max_steps=15).fit()
    assert ckpt.list_checkpoints(tmp_path) == ["step_1.safetensors", "step_2.safetensors", "step_3.safetensors",
                                               "step_15.safetensors", "final.safetensors"]


# ------------------------------------------------------------------ 2. non-finite weights are never saved
def test_an_update_to_inf_weights_is_rolled_back_and_never_saved(tmp_path):
    """The loss of the diverging step is finite (it is computed before the update): only a check
    of the updated weights catches it. Nothing non-finite reaches memory or disk."""
    cbs = [TerminateOnNaN(max_consecutive=2), Checkpoint(tmp_path, interval=1)]
    loop = regression_loop(cbs, lr=1e38, max_steps=1)
    result = loop.fit()
    assert loop.state.step == 0 and loop.state.extras["terminated_on_nan"]
    assert "weights non-finite for 2 consecutive steps" in result.stop_reason
    assert "last good checkpoint: none written" in result.stop_reason
    assert all(np.isfinite(np.array(v)).all() for v in loop.trainable_weights().values())
    assert ckpt.list_checkpoints(tmp_path) == []  # no final of a diverged run either


def test_no_checkpoint_holds_non_finite_weights_even_without_terminate_on_nan(tmp_path):
    from lazarus.callbacks import Callback

    class Poison(Callback):
        def on_step_end(self, state):
            if state.step + 1 == 3:
                state.model.update({"bias": mx.array([float("inf")])})

    loop = regression_loop([Poison(), Checkpoint(tmp_path, interval=2)], max_steps=4)
    with pytest.raises(ckpt.NonFiniteError, match=r"bias holds NaN or inf after step 4.*Last good checkpoint: .*step_2"):
        loop.fit()
    assert ckpt.list_checkpoints(tmp_path) == ["step_2.safetensors", "best.safetensors"]  # no step_4, no final
    all_checkpoints_finite(tmp_path)


def test_huge_learning_rate_exits_3_keeping_the_last_finite_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 20, "--set", "learning_rate=1e30",
                                       "--set", "checkpoint_interval=1", "--set", "max_grad_norm=null"))
    assert rc == 3, err
    assert "TerminateOnNaN" in err and "consecutive steps (last at step" in err
    names = ckpt.list_checkpoints(out / "checkpoints")
    assert "final.safetensors" not in names and names
    assert f"last good checkpoint: {out / 'checkpoints' / names[0]}" in err
    all_checkpoints_finite(out / "checkpoints")


def test_a_flipped_bit_is_detected_on_load(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 2, "--set", "checkpoint_interval=2"))
    assert rc == 0, err
    step = out / "checkpoints" / "step_2.safetensors"
    state = ckpt.state_file_for(step)
    for victim in (step, state):
        data = bytearray(victim.read_bytes())
        original = bytes(data)
        data[-5] ^= 0x10  # inside the last tensor's bytes
        victim.write_bytes(bytes(data))
        rc, _, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 3, "--resume", step))
        assert rc == 2 and "is corrupt: its checksum does not match" in one_line(err) and victim.name in err
        victim.write_bytes(original)
    rc, _, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 3, "--resume", step))
    assert rc == 0, err


# ------------------------------------------------------------------ 3. exit codes tell the truth
SIGNAL_RUN = "import sys; from lazarus.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_checkpoint_then_exit_130_or_143_with_the_resume_command(sig, code, tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "sft", "--model", str(tiny_dir), "--data", str(TRAIN), "--output", str(out),
            "--max-steps", "100000", "--set", "log_interval=2", "--set", "warmup_steps=0"]
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_RUN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, LAZARUS_DEBUG=""))
    # without a terminal, progress is a plain line every log_interval steps
    first = proc.stderr.readline()
    while first and not first.startswith("step "):  # e.g. a one-time autotune note comes first
        first = proc.stderr.readline()
    assert first.startswith("step 2/100000 loss="), first
    proc.send_signal(sig)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    line = [ln for ln in err.splitlines() if ln.startswith("lazarus: interrupted")][0]
    command = line.split("resume with: ", 1)[1]
    assert command.startswith(f"lazarus train sft --config {out / 'config.yaml'} --resume {out / 'checkpoints'}/step_")
    assert f"resume: {command}" in stdout
    if sig == signal.SIGTERM:  # the printed command continues the run (into its own folder)
        step = int(command.rsplit("step_", 1)[1].split(".")[0])
        argv = command.split()[1:] + ["--max-steps", str(step + 1)]
        proc = subprocess.run([sys.executable, "-c", SIGNAL_RUN, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"max_steps reached ({step + 1})" in proc.stdout


def _truncated_model(tiny_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    w = next(d.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return d


def _truncated_state(tiny_dir, tmp_path, capsys):
    rc, _, err = cli(capsys, *sft(tiny_dir, tmp_path / "a", "--max-steps", 1))
    assert rc == 0, err
    final = tmp_path / "a" / "checkpoints" / "final.safetensors"
    state = ckpt.state_file_for(final)
    state.write_bytes(state.read_bytes()[:100])
    return final


USER_ERRORS = {
    "truncated weights": (lambda t, tiny, c: ["--model", _truncated_model(tiny, t)], "cannot load model from"),
    "truncated state file": (lambda t, tiny, c: ["--resume", _truncated_state(tiny, t, c)], "cannot read resume state"),
    "unwritable checkpoint folder": (lambda t, tiny, c: ["--set", f"checkpoint_dir={_write(t / 'file', 'x')}/ck"],
                                     "cannot write"),
    "batch_size true": (lambda t, tiny, c: ["--set", "batch_size=true"], "batch_size: Value error, true/false"),
    "learning_rate inf": (lambda t, tiny, c: ["--set", "learning_rate=.inf"], "learning_rate"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_exit_2_with_one_line(case, tiny_dir, tmp_path, capsys):
    extra, expected = USER_ERRORS[case]
    args = sft(tiny_dir, tmp_path / "out", "--max-steps", 1, *extra(tmp_path, tiny_dir, capsys))
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and expected in one_line(err), err


def test_full_disk_names_the_path_and_no_space_left(tiny_dir, tmp_path, capsys, monkeypatch):
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real_open = open

    def full_open(path, mode="r", *a, **kw):
        if "w" in mode and str(path).endswith(".tmp.safetensors"):
            return real_open("/dev/full", "wb")
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(ckpt, "open", full_open, raising=False)
    rc, _, err = cli(capsys, *sft(tiny_dir, tmp_path / "out", "--max-steps", 1))
    line = one_line(err)
    assert rc == 2 and "no space left on device" in line and str(tmp_path / "out" / "checkpoints") in line
    # and a disk that cannot hold one checkpoint is refused before the first step
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10 ** 9, used=10 ** 9, free=1000))
    rc, out, err = cli(capsys, *sft(tiny_dir, tmp_path / "out2", "--max-steps", 1))
    assert rc == 2 and "no space left on device" in one_line(err) and "history" not in out


# ------------------------------------------------------------------ 4. no input crashes the process
def test_a_5mb_line_with_default_settings(tiny_dir, tmp_path, capsys):
    rows = [{"prompt": f"What is {i}+1?", "response": str(i + 1)} for i in range(8)]
    huge = "1234567890 " * (5_000_000 // 11)
    data = write_jsonl(tmp_path / "long_response.jsonl", rows + [{"prompt": "Count:", "response": huge}])
    t0 = time.time()
    rc, _, err = cli(capsys, *sft(tiny_dir, tmp_path / "a", "--max-steps", 2, "--set", "batch_size=9", data=data))
    assert rc == 0, err
    assert err.count("warning:") == 1 and "1 examples truncated" in err and "max_length=512" in err
    data = write_jsonl(tmp_path / "long_prompt.jsonl", rows + [{"prompt": huge, "response": "ok"}])
    rc, _, err = cli(capsys, *sft(tiny_dir, tmp_path / "b", "--max-steps", 2, data=data))
    line = one_line(err)
    assert rc == 2 and f"{data}:9: field 'prompt': prompt alone is more than" in line and "max_length=512" in line
    assert time.time() - t0 < 60  # only what can fit is tokenized


def test_datasets_built_without_max_length_get_the_models_context(tiny, tmp_path):
    from lazarus.data import SFTDataset
    from lazarus.training import SFTConfig, SFTTrainer

    model, tok = tiny
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "x " * 600}] * 4)
    ds = SFTDataset(f, tok)
    assert max(ds.lengths()) > 512
    with pytest.warns(UserWarning, match=r"4 examples truncated .* max_length=512 \(the model's context"):
        SFTTrainer(model, tok, SFTConfig(max_steps=1, checkpoint_interval=None, checkpoint_dir=str(tmp_path / "c"),
                                         warmup_steps=0)).train(ds)
    assert max(ds.lengths()) == 512


@pytest.mark.parametrize("content,line,field,message", [
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n', 2, None, "not UTF-8"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}\n', 1,
     "messages[1].content", "is empty"),
    (b'{"prompt": "a", "response": "b"}\n' + b"[" * 100000 + b"\n", 2, None, "nested too deeply"),
])
def test_validation_gaps(tiny, tmp_path, content, line, field, message):
    from lazarus.data import DataError, SFTDataset

    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError) as e:
        SFTDataset(f, tiny[1])
    assert e.value.line == line and e.value.field == field and message in str(e.value)


# ------------------------------------------------------------------ 5. resume never silently changes the run
def test_resume_refuses_a_changed_learning_rate_or_changed_data(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 2, "--set", "checkpoint_interval=2",
                                  "--set", "batch_size=8"))
    assert rc == 0, err
    step = out / "checkpoints" / "step_2.safetensors"
    saved = (out / "config.yaml").read_text()
    rc, _, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 4, "--set", "batch_size=8", "--resume", step,
                                  "--set", "learning_rate=1e-3"))
    assert rc == 2 and "learning_rate is 0.001 now but 1e-05 in the checkpoint" in one_line(err)
    assert (out / "config.yaml").read_text() == saved  # config.yaml still says what ran
    # the same number of examples, other content
    rows = [json.loads(x) for x in TRAIN.read_text().splitlines() if x.strip()]
    other = write_jsonl(tmp_path / "other.jsonl", [dict(r, response=r["response"] + "!") for r in rows])
    rc, _, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 4, "--set", "batch_size=8", "--resume", step,
                                  data=other))
    assert rc == 2 and "training data changed" in one_line(err) and "--allow-data-change" in err
    rc, _, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 4, "--set", "batch_size=8", "--resume", step,
                                  "--allow-data-change", data=other))
    assert rc == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["data"] == str(other)


# ------------------------------------------------------------------ 7. temp files, pruning, the lock
def test_leftover_temp_files_are_cleaned_and_never_listed(tiny_dir, tmp_path, capsys):
    ck = tmp_path / "run" / "checkpoints"
    rc, _, err = cli(capsys, *sft(tiny_dir, tmp_path / "run", "--max-steps", 1))
    assert rc == 0, err
    (ck / ".step_9.safetensors.123.abcdef12.tmp.safetensors").write_bytes(b"half a file")
    (ck / "step_9.0123456789ab.state.safetensors").write_bytes(b"orphan")
    rc, out, err = cli(capsys, *sft(tiny_dir, tmp_path / "run", "--max-steps", 2, "--resume",
                                    ck / "final.safetensors"))
    assert rc == 0, err
    assert not list(ck.glob("*tmp*")) and not (ck / "step_9.0123456789ab.state.safetensors").exists()
    assert f"  checkpoints: {ck} (final.safetensors)\n" in out


def test_pruning_never_deletes_outside_the_folder(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    victim = tmp_path / "x"
    victim.write_text("keep me")
    # a planted checkpoint whose metadata names ../x as its state file
    mx.save_safetensors(str(ck / "step_0.safetensors"), {"w": mx.zeros(1)}, metadata={"lazarus_state_file": "../x"})
    ckpt.remove_checkpoint(ck / "step_0.safetensors")
    assert victim.read_text() == "keep me"
    with pytest.raises(ckpt.CheckpointError, match="invalid resume state file"):
        ckpt.read_checkpoint(ck / "step_0.safetensors" if (ck / "step_0.safetensors").exists() else _plant(ck))
    # a resume state that lists ../x among "its" files
    cb = Checkpoint(ck, interval=1, keep_last=1, save_best=False)
    cb.written = ["../x", "step_0.safetensors"]
    regression_loop([cb], max_steps=2).fit()
    assert victim.read_text() == "keep me"


def _plant(ck):
    mx.save_safetensors(str(ck / "step_5.safetensors"), {"w": mx.zeros(1)}, metadata={"lazarus_state_file": "../x"})
    return ck / "step_5.safetensors"


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from lazarus.checkpointing import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_two_runs_never_write_one_checkpoint_folder(tiny_dir, tmp_path, capsys):
    ck = tmp_path / "run" / "checkpoints"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ck)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = cli(capsys, *sft(tiny_dir, tmp_path / "run", "--max-steps", 1))
        assert rc == 2 and f"is in use by another run (pid {holder.pid})" in one_line(err)
    finally:
        holder.kill()
        holder.wait()
    rc, _, err = cli(capsys, *sft(tiny_dir, tmp_path / "run", "--max-steps", 1))  # a killed holder leaves no lock
    assert rc == 0, err


# ------------------------------------------------------------------ 8. model folders are data, never code
def test_a_tokenizer_that_needs_custom_code_is_refused_without_running_it(tiny_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    marker = tmp_path / "ran"
    (d / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                         "from transformers import PreTrainedTokenizerFast\n"
                                         "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]})
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    # transformers asks "run the custom code? [y/N]" on stdin when nobody said no: answer yes
    args = [str(a) for a in sft(d, tmp_path / "out", "--max-steps", 1)]
    proc = subprocess.run([sys.executable, "-c", SIGNAL_RUN, *args], input="y\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "never runs code from model folders" in one_line(proc.stderr)
    assert not marker.exists()


# ------------------------------------------------------------------ issue 18: honest summaries, W&B
def test_summary_says_where_logs_went_and_warmup_beyond_the_run_warns(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, *sft(tiny_dir, out, "--max-steps", 2, "--set", "warmup_steps=5",
                                       "--set", "tensorboard=true", "--set", "wandb=lazarus-tests"))
    assert rc == 0, err
    assert "warning: warmup_steps=5 is not below the 2 planned steps" in err
    assert f"tensorboard: {out / 'tb'} (view: tensorboard --logdir {out / 'tb'})" in stdout
    assert f"wandb: {out / 'wandb'}" in stdout and "wandb sync" in stdout  # inside the run folder
    assert list((out / "wandb").glob("offline-run-*"))


def test_wandb_without_an_account_exits_2_without_prompting(tiny_dir, tmp_path, capsys, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    rc, _, err = cli(capsys, *sft(tiny_dir, tmp_path / "out", "--max-steps", 1, "--set", "wandb=true"))
    line = one_line(err)
    assert rc == 2 and "wandb login" in line and "WANDB_MODE=offline" in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_example_configs_keep_their_logs_inside_the_output_folder():
    for f in (REPO / "examples").glob("*.yaml"):
        doc = yaml.safe_load(f.read_text())
        for key in ("tensorboard",):
            assert doc.get(key) in (None, True, False), f"{f.name}: {key} must not name a folder outside --output"
        wandb = doc.get("wandb")
        assert not (isinstance(wandb, dict) and "dir" in wandb), f.name
