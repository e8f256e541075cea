"""Data-parallel training: two local ranks over the ring backend (mlx.launch)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "distributed_sft.py"


def launch(args, out, n=2, timeout=240, env=None):
    cmd = [sys.executable, "-m", "lazarus.launch", "-n", str(n), str(SCRIPT)] if n > 1 else [sys.executable, str(SCRIPT)]
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=e)


def result(out, rank=0):
    return json.loads((Path(out) / f"result_rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory, examples_dir=Path(__file__).parent.parent / "lazarus" / "data" / "examples"):
    d = tmp_path_factory.mktemp("dist")
    lines = (examples_dir / "sft_train.jsonl").read_text().splitlines()[:64]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def two_rank_run(tiny_dir, data):
    out = data / "two"
    p = launch([tiny_dir, data / "train.jsonl", out, 6], out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_ranks_agree_and_match_one_process(tiny_dir, data, two_rank_run):
    r0, r1 = result(two_rank_run, 0), result(two_rank_run, 1)
    assert r0["world"] == r1["world"] == 2
    assert r0["digest"] == r1["digest"]  # bit-identical weights on both ranks
    assert r0["losses"] == r1["losses"]  # reduced metrics: both ranks saw the same loss
    single = data / "one"
    p = launch([tiny_dir, data / "train.jsonl", single, 6], single, n=1)
    assert p.returncode == 0, p.stderr[-3000:]
    one = result(single, 0)
    assert one["world"] == 1 and len(one["losses"]) == len(r0["losses"]) == 6
    for a, b in zip(one["losses"], r0["losses"]):
        assert abs(a - b) < 1e-5
    # only rank 0 wrote checkpoints and logs
    assert (two_rank_run / "rank0" / "ck" / "final.safetensors").exists()
    assert list((two_rank_run / "rank0" / "tb").iterdir())
    assert not (two_rank_run / "rank1").exists()


def test_packed_rows_on_two_ranks_match_one_process(tiny_dir, data):
    """packing: true splits each global batch of packed rows across the ranks: both ranks keep the same
    weights at every step, and a full global batch gives one process's loss. (The 64 examples pack into 13
    rows: the trailing 5-row batch cannot be split over 2 ranks and is dropped there, as unpacked batches
    are, so only the first step sees the same rows in both runs.)"""
    runs = {}
    for n in (1, 2):
        out = data / f"packed{n}"
        p = launch([tiny_dir, data / "train.jsonl", out, 3, "--packing"], out, n=n)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[n] = [result(out, r) for r in range(n)]
    (one,), (r0, r1) = runs[1], runs[2]
    assert r0["digest"] == r1["digest"] and r0["losses"] == r1["losses"] and len(r0["losses"]) == 3
    assert abs(one["losses"][0] - r0["losses"][0]) < 1e-5


def test_two_rank_resume_is_exact(tiny_dir, data, two_rank_run):
    out = data / "resumed"
    p = launch([tiny_dir, data / "train.jsonl", out, 6, "--stop-at", 3], out)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = out / "rank0" / "ck" / "step_3.safetensors"
    assert ck.exists()
    p = launch([tiny_dir, data / "train.jsonl", out, 6, "--resume", ck], out)
    assert p.returncode == 0, p.stderr[-3000:]
    straight, resumed = result(two_rank_run, 0), result(out, 0)
    assert resumed["digest"] == straight["digest"] == result(out, 1)["digest"]
    assert resumed["losses"] == straight["losses"]


def test_failing_rank_fails_the_launch_without_hanging(tiny_dir, data):
    out = data / "fail"
    p = launch([tiny_dir, data / "train.jsonl", out, 6, "--fail-rank", 1], out, timeout=120,
               env={"LAZARUS_DIST_TIMEOUT": "10"})
    assert p.returncode != 0
    assert "rank 1 failed on purpose" in p.stderr
    assert "distributed run failed" in p.stderr


def test_two_rank_grpo_shares_prompts_and_stays_in_sync(tiny_dir, data):
    out = data / "grpo"
    out.mkdir()
    prompts = Path(__file__).parent.parent / "lazarus" / "data" / "examples" / "prompts_train.jsonl"
    cmd = [sys.executable, "-m", "lazarus.launch", "-n", "2", str(Path(__file__).parent / "distributed_grpo.py"),
           str(tiny_dir), str(prompts), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((out / f"grpo_rank{r}.json").read_text()) for r in (0, 1))
    assert r0["digest"] == r1["digest"] and r0["losses"] == r1["losses"] and r0["steps"] == 3
    assert r0["rewards"] == r1["rewards"]  # rollout metrics averaged over both ranks
    # each rank scored its own half of every global prompt batch (2 prompts x group 2 per step)
    assert len(r0["prompts"]) == len(r1["prompts"]) == 3 * 2 * 2
    assert not set(r0["prompts"]) & set(r1["prompts"])


def test_ranks_start_equal_without_any_seeding(tiny_dir, data):
    """No mx.random.seed anywhere and each rank starting from different weights (as a clock-seeded
    init gives): fit start makes every rank rank 0's copy, and they agree at every checkpoint."""
    out = data / "unseeded"
    p = launch([tiny_dir, data / "train.jsonl", out, 4, "--no-seed", "--perturb-per-rank", "--checkpoint-interval", 2],
               out)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = result(out, 0), result(out, 1)
    assert set(r0["checkpoint_digests"]) == {"step_2", "step_4", "final"}
    assert r0["checkpoint_digests"] == r1["checkpoint_digests"]
    assert r0["digest"] == r1["digest"] and r0["losses"] == r1["losses"]


def test_ranks_that_drift_apart_stop_at_the_next_checkpoint(tiny_dir, data):
    out = data / "desync"
    p = launch([tiny_dir, data / "train.jsonl", out, 6, "--desync-at", 2, "--checkpoint-interval", 3], out,
               timeout=120, env={"LAZARUS_DIST_TIMEOUT": "20"})
    assert p.returncode != 0
    assert "ranks disagree at step 3: rank 1's trainable weights differ from rank 0's" in p.stderr
    assert not (out / "rank0" / "ck" / "step_3.safetensors").exists()


def test_cli_lora_ranks_are_identical_without_a_seed(tiny_dir, data):
    out = data / "cli"
    out.mkdir()
    cmd = [sys.executable, "-m", "lazarus.launch", "-n", "2", str(Path(__file__).parent / "distributed_cli.py"),
           str(out), "train", "sft", "--model", str(tiny_dir), "--data", str(data / "train.jsonl"), "--lora",
           "--max-steps", "4", "--output", str(out / "run"), "--set", "batch_size=8", "--set", "learning_rate=1e-3",
           "--set", "warmup_steps=0", "--set", "checkpoint_interval=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((out / f"cli_rank{r}.json").read_text()) for r in (0, 1))
    assert r0["rc"] == r1["rc"] == 0
    assert set(r0["digests"]) >= {"step_2", "step_4", "final"}
    assert r0["digests"] == r1["digests"]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a killed process not yet reaped by its parent is a zombie: it runs no more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _group_alive(pgid):
    """Whether any live process is in process group ``pgid`` (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _start_slow_job(tiny_dir, data, out):
    out.mkdir()
    cmd = [sys.executable, "-m", "lazarus.launch", "-n", "2", str(SCRIPT), str(tiny_dir), str(data / "train.jsonl"),
           str(out), "100000", "--step-sleep", "0.2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not all((out / f"pid_rank{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    time.sleep(0.5)  # the pid file is written before the file is closed; and let a step or two pass
    return proc, [int((out / f"pid_rank{r}").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("victim", ["rank", "launcher", "sigterm"])
def test_a_killed_rank_or_launcher_ends_the_whole_job(tiny_dir, data, victim):
    """kill -9 of one rank: the launcher ends the other within seconds and exits non-zero.
    kill -9 of the launcher: no rank survives it (each rank's watchdog sees the launcher gone).
    SIGTERM to the launcher: every rank stops at the same step, rank 0 checkpoints, exit 143."""
    proc, pids = _start_slow_job(tiny_dir, data, data / f"kill_{victim}")
    job = os.getpgid(pids[0])  # mlx.launch and the ranks: the launcher gives them a group of their own
    t0 = time.time()
    if victim == "rank":
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert "distributed run failed" in err and "rank 1" in err
    elif victim == "launcher":
        proc.kill()
        proc.wait()
    else:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        out = data / f"kill_{victim}"
        r0, r1 = (json.loads((out / f"result_rank{r}.json").read_text()) for r in (0, 1))
        assert r0["stop_reason"] == r1["stop_reason"] == "interrupted by SIGTERM"
        assert r0["losses"] == r1["losses"]
        assert (out / "rank0" / "ck" / f"step_{len(r0['losses'])}.safetensors").exists()
    while _group_alive(job) and time.time() - t0 < 60:
        time.sleep(0.2)
    assert time.time() - t0 < 60
    assert not any(_alive(p) for p in pids), "a rank survived"
    assert not _group_alive(job), "mlx.launch survived"
