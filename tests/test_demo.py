"""`lazarus demo`: the quick mode end to end; the full run is opt-in (LAZARUS_SLOW_TESTS=1)."""

import json
import os
import re

import pytest

from lazarus.cli import main


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "stale.txt").write_text("from an earlier run")
    (out / "keep.txt").write_text("not the demo's")
    rc = main(["demo", "--quick", "--output", str(out), "--progress"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err

    # before/after table
    assert re.search(r"base \(random init\)\s+\d+\.\d% \(\d+/8\)", stdout), stdout
    assert "after SFT " in stdout and "after SFT + DPO" in stdout
    assert "held-out accuracy" in stdout and "eval loss" in stdout and "hedged" in stdout
    # where things are
    assert f"{out / 'sft' / 'checkpoints'}" in stdout and "tensorboard --logdir" in stdout
    assert "lazarus generate --model" in stdout
    # progress bars were shown (tqdm writes "train" bars with the step counter)
    assert "train: 100%" in stdout or "30/30" in stdout

    summary = json.loads((out / "results.json").read_text())
    assert summary["quick"] is True
    names = [r["model"] for r in summary["results"]]
    assert names == ["base (random init)", "after SFT", "after SFT + DPO"]
    for r in summary["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["total"] == 8 and r["eval_loss"] > 0
    base, sft, _ = summary["results"]
    assert sft["eval_loss"] < base["eval_loss"]  # even 30 steps of SFT lower the held-out loss

    # the demo's data: hedged SFT answers, and plain > hedged preference pairs on the same questions
    sft_rows = [json.loads(x) for x in (out / "data" / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (out / "data" / "preferences.jsonl").read_text().splitlines()]
    hedged = sum(r["response"].endswith(", I think") for r in sft_rows) / len(sft_rows)
    assert 0.7 < hedged < 0.9 and len(pairs) == len(sft_rows)
    assert all(p["rejected"] == p["chosen"] + ", I think" for p in pairs)

    assert (out / "model" / "config.json").exists()
    assert (out / "sft" / "checkpoints" / "final.safetensors").exists()
    assert (out / "dpo" / "checkpoints" / "final.safetensors").exists()
    assert list((out / "runs" / "sft").glob("events.out.tfevents.*"))
    assert list((out / "runs" / "dpo").glob("events.out.tfevents.*"))
    assert not (out / "sft" / "stale.txt").exists()  # the demo's own folders are rebuilt ...
    assert (out / "keep.txt").exists()  # ... nothing else is touched

    # the printed "try it" command works
    ck = out / "dpo" / "checkpoints" / "final.safetensors"
    rc = main(["generate", "--model", str(out / "model"), "--checkpoint", str(ck), "--prompt", "What is 2+3?",
               "--max-tokens", "4"])
    assert rc == 0


@pytest.mark.skipif(not os.environ.get("LAZARUS_SLOW_TESTS"), reason="the full demo takes 1-2 minutes; "
                                                                        "set LAZARUS_SLOW_TESTS=1 to run it")
def test_demo_full_improves_accuracy(tmp_path, capsys):
    rc = main(["demo", "--output", str(tmp_path), "--no-progress"])
    assert rc == 0
    base, sft, dpo = json.loads((tmp_path / "results.json").read_text())["results"]
    assert base["accuracy"] <= 0.1
    assert sft["right_sum"] >= 0.7 and sft["hedged"] >= 0.5  # SFT taught the sums, and the hedge
    assert dpo["accuracy"] >= sft["accuracy"] + 0.3 and dpo["hedged"] <= 0.1  # DPO removed the hedge
    assert dpo["right_sum"] >= sft["right_sum"] - 0.1
    assert sft["eval_loss"] < 0.5 * base["eval_loss"] and dpo["eval_loss"] < sft["eval_loss"]
