"""Every example script and YAML config in examples/ runs (in its quick mode)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lazarus.cli import build_parser, main, resolve_train_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO / "examples"
YAMLS = ["sft", "dpo", "grpo", "ppo", "orpo", "simpo", "kto", "reward"]


def _available(paradigm):
    from lazarus.cli import load_paradigm

    try:
        load_paradigm(paradigm)
        return True
    except Exception:  # noqa: BLE001
        return False


def _run_script(name, tmp_path, *extra):
    proc = subprocess.run([sys.executable, str(EXAMPLES_DIR / name), "--quick", "--output", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sft_example(tmp_path):
    out = _run_script("sft.py", tmp_path)
    assert "max_steps reached (20)" in out
    assert "eval loss by step" in out
    assert (tmp_path / "checkpoints" / "final.safetensors").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_example(tmp_path, lora):
    out = _run_script("dpo.py", tmp_path, *(["--lora"] if lora else []))
    assert "margin" in out and "stopped:" in out
    assert (tmp_path / "dpo" / "final.safetensors").exists()
    assert (tmp_path / "dpo" / "adapters.safetensors").exists() == lora


def test_reward_then_ppo_example(tmp_path):
    out = _run_script("reward_then_ppo.py", tmp_path)
    assert "reward model: pair accuracy" in out and "after PPO (4 steps): learned reward" in out
    assert (tmp_path / "reward" / "reward_model" / "reward_model.json").exists()


def test_custom_objective_example_runs(tmp_path):
    out = _run_script("custom_objective.py", tmp_path)
    assert "max_steps reached (8)" in out
    assert (tmp_path / "checkpoints" / "final.safetensors").exists()


def test_custom_objective_is_a_slic_hinge(tiny):
    """The subclass's compute_loss is the SLiC hinge: equal chosen/rejected rows give delta (+ the NLL term)."""
    import mlx.core as mx

    from lazarus.training.base import token_logps

    spec = importlib.util.spec_from_file_location("custom_objective", EXAMPLES_DIR / "custom_objective.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, tok = tiny
    ids = mx.array([[5, 6, 7, 8], [5, 6, 7, 8]])
    batch = {"inputs": ids, "targets": ids, "mask": mx.ones(ids.shape)}
    nll = -token_logps(model, ids[:1], ids[:1]).mean().item()
    for weight in (0.0, 0.5):
        trainer = mod.SLiCTrainer(model, tok, mod.SLiCConfig(delta=0.7, nll_weight=weight, checkpoint_interval=None))
        loss, metrics = trainer.compute_loss(model, batch)
        assert loss.item() == pytest.approx(0.7 + weight * nll, rel=1e-5)
        assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(Exception, match="delta"):
        mod.SLiCConfig(delta=-1)


@pytest.mark.parametrize("paradigm", YAMLS)
def test_yaml_config_is_valid(paradigm, monkeypatch):
    if not _available(paradigm):
        pytest.skip(f"lazarus.training has no {paradigm.upper()} trainer in this checkout")
    monkeypatch.chdir(REPO)
    args = build_parser().parse_args(["train", paradigm, "--config", str(EXAMPLES_DIR / f"{paradigm}.yaml")])
    _, run, config, _, _ = resolve_train_config(args)
    raw = yaml.safe_load((EXAMPLES_DIR / f"{paradigm}.yaml").read_text())
    assert (REPO / run["data"]).exists()
    assert config.max_steps == raw["max_steps"]


@pytest.mark.parametrize("paradigm", YAMLS)
def test_yaml_config_trains(paradigm, tiny_dir, tmp_path, monkeypatch, capsys):
    if not _available(paradigm):
        pytest.skip(f"lazarus.training has no {paradigm.upper()} trainer in this checkout")
    monkeypatch.chdir(REPO)  # the YAMLs name the shipped data and examples/rewards.py relative to the repo root
    out = tmp_path / "out"
    rc = main(["train", paradigm, "--config", str(EXAMPLES_DIR / f"{paradigm}.yaml"), "--model", str(tiny_dir),
               "--output", str(out), "--max-steps", "2", "--tensorboard", str(tmp_path / "tb"),
               "--set", "log_interval=1", "--set", "checkpoint_interval=2"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert (out / "checkpoints" / "final.safetensors").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
