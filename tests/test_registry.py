"""The trainer registry: a paradigm registered in one line is a `lazarus train` subcommand that trains;
every trainer is built with the same keywords; one prompt encoding for training and generation."""

import json
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from lazarus.cli import PARADIGMS, RUN_KEYS
from lazarus.training import SFTConfig, SFTTrainer, registry
from conftest import run_cli


class ScaledConfig(SFTConfig):
    scale: float = Field(1.0, gt=0, description="Multiplies the SFT loss")


class ScaledSFTTrainer(SFTTrainer):
    """SFT with its loss multiplied by ``scale`` (logged as ``scaled_loss``)."""

    config_class = ScaledConfig

    def compute_loss(self, model, batch):
        loss, metrics = super().compute_loss(model, batch)
        return loss * self.config.scale, {**metrics, "scaled_loss": loss * self.config.scale}


@pytest.fixture
def scaled():
    registry.register("scaled-sft", ScaledSFTTrainer, ScaledConfig, "SFT with a scaled loss")
    yield "scaled-sft"
    registry.unregister("scaled-sft")


def test_registered_paradigm_is_a_subcommand_that_trains(scaled, tiny_dir, examples, tmp_path, capsys):
    assert scaled in PARADIGMS and "scaled-sft" in RUN_KEYS["data"][2] and "scaled-sft" not in RUN_KEYS["reward"][2]
    rc, out, _ = run_cli(capsys, "train", "--help")
    assert rc == 0 and "scaled-sft" in out and "SFT with a scaled loss" in out
    rc, out, _ = run_cli(capsys, "train", scaled, "--help")
    assert rc == 0 and "ScaledSFTTrainer: SFT with a scaled loss" in out
    assert '{"prompt", "response"} or {"messages"}' in out  # data format from the trainer's dataset class
    assert any(ln.split()[:1] == ["scale"] and "[default: 1.0]" in ln for ln in out.splitlines())
    rc, _, err = run_cli(capsys, "train")
    assert rc == 2 and "{sft,dpo,grpo,ppo,orpo,simpo,kto,reward,scaled-sft}" in err

    out_dir = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", scaled, "--model", tiny_dir, "--data", examples / "sft_train.jsonl",
                           "--output", out_dir, "--max-steps", 2, "--set", "scale=2.5", "--set", "log_interval=1",
                           "--set", "warmup_steps=0", "--set", "progress_bar=false")
    assert rc == 0, err
    assert "lazarus train scaled-sft: max_steps reached (2)" in out
    rows = [h for h in json.loads((out_dir / "history.json").read_text()) if "loss" in h]
    assert len(rows) == 2 and all(h["scaled_loss"] == pytest.approx(h["loss"]) for h in rows)
    assert yaml.safe_load((out_dir / "config.yaml").read_text())["scale"] == 2.5
    assert (out_dir / "checkpoints" / "final.safetensors").exists()

    rc, _, err = run_cli(capsys, "train", scaled, "--model", tiny_dir, "--data", examples / "sft_train.jsonl",
                         "--output", tmp_path / "other", "--set", "reference_model=x")
    assert rc == 2 and "'reference_model' is not used by `lazarus train scaled-sft`" in err


def test_unregistered_paradigm_is_gone(scaled, capsys):
    registry.unregister(scaled)
    rc, _, err = run_cli(capsys, "train", scaled, "--help")
    assert rc == 2 and "invalid choice" in err
    assert scaled not in PARADIGMS and scaled not in RUN_KEYS["data"][2]


def test_register_refuses_taken_names_and_wrong_classes():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("sft", ScaledSFTTrainer, ScaledConfig)
    with pytest.raises(ValueError, match="lower-case"):
        registry.register("Bad Name", ScaledSFTTrainer, ScaledConfig)
    with pytest.raises(TypeError, match="Trainer subclass"):
        registry.register("not-a-trainer", object, ScaledConfig)
    with pytest.raises(TypeError, match="TrainerConfig subclass"):
        registry.register("not-a-config", ScaledSFTTrainer, dict)
    assert [p.name for p in registry.paradigms()] == ["sft", "dpo", "grpo", "ppo", "orpo", "simpo", "kto", "reward"]
    with pytest.raises(KeyError, match="registered: sft, dpo, grpo, ppo, orpo, simpo, kto, reward"):
        registry.get("nope")


def test_every_trainer_is_built_with_the_same_keywords(tiny, tiny_dir, tmp_path):
    from lazarus.models import load_model

    model, tok = tiny
    reference, _ = load_model(tiny_dir)
    for paradigm in registry.paradigms():
        config = paradigm.config_class(checkpoint_dir=str(tmp_path / paradigm.name))
        extras = {"reward_fn": lambda prompts, completions, **kw: [0.0] * len(completions)} if paradigm.reward else {}
        ref = reference if paradigm.reference_model else None
        trainer = paradigm.trainer_class(model=model, tokenizer=tok, config=config, callbacks=[],
                                         reference_model=ref, **extras)
        assert trainer.config is config and trainer.tokenizer is tok
        assert getattr(trainer, "reference_model", None) is ref
    with pytest.raises(TypeError, match="SFTTrainer does not use a reference model"):
        SFTTrainer(model=model, tokenizer=tok, reference_model=reference)
    with pytest.raises(TypeError, match="reference_model must be an mlx.nn.Module"):
        registry.get("dpo").trainer_class(model, tok, reference)  # tokenizer where the reference goes


def test_generation_and_datasets_encode_prompts_alike(tiny, tmp_path):
    from lazarus.data import PromptDataset, chat_prompt_ids

    _, tok = tiny
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "What is 2+3?"}) + "\n")
    for system in (None, "Answer with a number."):
        ds = PromptDataset(f, tok, system_prompt=system)
        assert ds.examples[0].ids == chat_prompt_ids(tok, "What is 2+3?", system)
    assert tok.decode(chat_prompt_ids(tok, "What is 2+3?")) == "<|user|>What is 2+3?<|end|><|assistant|>"


def test_demo_and_cli_do_not_import_each_other():
    for module in ("lazarus/demo.py", "lazarus/data/chat.py", "lazarus/cli_common.py"):
        assert "lazarus.cli import" not in (Path(__file__).resolve().parent.parent / module).read_text(), module
