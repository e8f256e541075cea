"""The `lazarus` command line: train (YAML + flags), help, errors, init-model, generate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from lazarus.cli import PARADIGMS, RUN_KEYS, _fmt_default, config_fields, load_paradigm
from conftest import run_cli

REPO = Path(__file__).resolve().parent.parent


def available(paradigm):
    try:
        load_paradigm(paradigm)
        return True
    except Exception:  # noqa: BLE001
        return False


def needs(paradigm):
    return pytest.mark.skipif(not available(paradigm),
                              reason=f"lazarus.training has no {paradigm.upper()} trainer in this checkout")


def sft_args(tiny_dir, examples, out, *extra):
    return ["train", "sft", "--model", tiny_dir, "--data", examples / "sft_train.jsonl", "--output", out, *extra]


def history(out):
    return json.loads((Path(out) / "history.json").read_text())


# ------------------------------------------------------------------------------ help
@pytest.mark.parametrize("paradigm", list(PARADIGMS))
def test_help_documents_every_config_field_with_default(paradigm, capsys):
    if not available(paradigm):
        pytest.skip(f"no {paradigm.upper()} trainer in this checkout")
    rc, out, _ = run_cli(capsys, "train", paradigm, "--help")
    assert rc == 0
    _, config_cls = load_paradigm(paradigm)
    lines = out.splitlines()
    for name, _typ, default, desc in config_fields(config_cls):
        line = next((ln for ln in lines if ln.split() and ln.split()[0] == name), None)
        assert line is not None, f"--help does not document {name}"
        assert f"[default: {_fmt_default(default)}]" in line, line
        assert desc.split()[0] in line
    for key, (_, _, which) in RUN_KEYS.items():
        if paradigm in which:
            assert any(ln.split() and ln.split()[0] == key for ln in lines), key
    if paradigm == "dpo":
        assert any(ln.split()[:1] == ["dpo.beta"] and "[default: 0.1]" in ln for ln in lines)


def test_top_level_help_and_version(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0
    for cmd in ("train", "init-model", "demo", "generate"):
        assert cmd in out
    rc, out, _ = run_cli(capsys, "--version")
    assert rc == 0 and "lazarus" in out


def test_entry_point_runs_as_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lazarus", "train", "sft", "--model", tmp_path / "missing",
                           "--data", "x.jsonl"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "missing" in proc.stderr


# ------------------------------------------------------------------------------ train
def test_train_sft_yaml_with_flag_overrides_and_loggers(tiny_dir, examples, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(tmp_path / "not-used"),  # overridden by --model
        "data": str(examples / "sft_train.jsonl"),
        "eval_data": str(examples / "sft_eval.jsonl"),
        "max_steps": 50,  # overridden by --max-steps
        "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 1, "log_interval": 2, "eval_interval": 2,
        "tensorboard": str(tmp_path / "tb"),
        "wandb": {"project": "lazarus-tests", "dir": str(tmp_path)},
        "progress_bar": False,
    }))
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "train", "sft", "--config", cfg, "--model", tiny_dir, "--max-steps", 4,
                              "--output", out, "--set", "seed=3")
    assert rc == 0, err
    assert "max_steps reached (4)" in stdout
    rows = history(out)
    assert [h["step"] for h in rows if "loss" in h] == [2, 4]
    assert [h["step"] for h in rows if "eval/loss" in h] == [2, 4]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["max_steps"] == 4 and resolved["seed"] == 3 and resolved["learning_rate"] == 1e-3
    assert resolved["model"] == str(tiny_dir)
    assert "checkpoint_dir" not in resolved  # it follows the output folder
    assert (out / "checkpoints" / "final.safetensors").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))

    # the saved config reruns as is (into another output folder)
    rc, stdout, err = run_cli(capsys, "train", "sft", "--config", out / "config.yaml", "--output", tmp_path / "again",
                              "--max-steps", 2, "--set", "wandb=false")
    assert rc == 0, err
    assert (tmp_path / "again" / "checkpoints" / "final.safetensors").exists()


def test_train_sft_lora_then_generate_with_adapters(tiny_dir, examples, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, *sft_args(tiny_dir, examples, out, "--lora", "--max-steps", 3,
                                                "--set", "lora_unused=1"))
    assert rc == 2 and "unknown key 'lora_unused'" in err
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("lora: {rank: 4, alpha: 8}\nbatch_size: 4\nlearning_rate: 1.0e-3\n")
    rc, stdout, err = run_cli(capsys, *sft_args(tiny_dir, examples, out, "--config", cfg, "--lora",
                                                "--max-steps", 3))
    assert rc == 0, err
    ck = out / "checkpoints"
    adapter_cfg = json.loads((ck / "adapter_config.json").read_text())
    assert adapter_cfg["lora_parameters"]["rank"] == 4
    assert adapter_cfg["lora_parameters"]["scale"] == 2.0
    assert "--adapter-path" in stdout
    rc, text, err = run_cli(capsys, "generate", "--model", tiny_dir, "--adapter-path", ck, "--prompt", "What is 2+3?",
                            "--max-tokens", 4)
    assert rc == 0, err
    rc, text2, err = run_cli(capsys, "generate", "--model", tiny_dir, "--adapter-path", ck, "--checkpoint",
                             ck / "final.safetensors", "--prompt", "What is 2+3?", "--max-tokens", 4)
    assert rc == 0, err
    assert text == text2  # final.safetensors holds the same adapters


def test_resume_continues_exactly(tiny_dir, examples, tmp_path, capsys):
    common = ["--max-steps", 4, "--set", "batch_size=8", "--set", "learning_rate=1e-3", "--set", "log_interval=1",
              "--set", "checkpoint_interval=2", "--set", "warmup_steps=0"]
    rc, _, err = run_cli(capsys, *sft_args(tiny_dir, examples, tmp_path / "a", *common))
    assert rc == 0, err
    rc, out, err = run_cli(capsys, *sft_args(tiny_dir, examples, tmp_path / "b", *common, "--resume",
                                             tmp_path / "a" / "checkpoints" / "step_2.safetensors"))
    assert rc == 0, err
    straight = [h["loss"] for h in history(tmp_path / "a") if "loss" in h]
    resumed = [h["loss"] for h in history(tmp_path / "b") if "loss" in h]
    assert len(straight) == len(resumed) == 4
    assert resumed == pytest.approx(straight, rel=1e-5)


def test_train_dpo_lora(tiny_dir, examples, tmp_path, capsys):
    out = tmp_path / "dpo"
    rc, stdout, err = run_cli(capsys, "train", "dpo", "--model", tiny_dir, "--data", examples / "preferences.jsonl",
                              "--output", out, "--lora", "--max-steps", 3, "--set", "dpo.beta=0.2",
                              "--set", "log_interval=1", "--set", "batch_size=4")
    assert rc == 0, err
    rows = [h for h in history(out) if "loss" in h]
    assert len(rows) == 3 and all("rewards/margins" in h for h in rows)
    assert yaml.safe_load((out / "config.yaml").read_text())["dpo"]["beta"] == 0.2
    assert (out / "checkpoints" / "adapters.safetensors").exists()


def _reward_file(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def digits(prompts, completions, answer, **kw):\n"
                 "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n")
    return f


@pytest.mark.parametrize("paradigm", ["grpo", "ppo"])
def test_train_rl_with_reward_from_file_and_module(paradigm, tiny_dir, examples, tmp_path, capsys, monkeypatch):
    if not available(paradigm):
        pytest.skip(f"no {paradigm.upper()} trainer in this checkout")
    f = _reward_file(tmp_path)
    base = ["train", paradigm, "--model", tiny_dir, "--data", examples / "prompts_train.jsonl", "--max-steps", 2,
            "--set", "group_size=2", "--set", "max_completion_length=4", "--set", "batch_size=2",
            "--set", "log_interval=1"]
    rc, _, err = run_cli(capsys, *base, "--output", tmp_path / "a", "--set", f"reward={f}:digits")
    assert rc == 0, err
    assert all("reward" in h for h in history(tmp_path / "a") if "loss" in h)
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, _, err = run_cli(capsys, *base, "--output", tmp_path / "b", "--set", "reward=my_rewards:digits")
    assert rc == 0, err


# ------------------------------------------------------------------------------ user errors
def _bad_data(tmp_path):
    return write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "What is 1+1?", "response": "2"},
                                                {"prompt": "What is 1+2?", "responce": "3"}])


ERROR_CASES = {
    "missing config": (lambda t, e, m: ["--config", t / "nope.yaml"], "config file not found"),
    "bad yaml": (lambda t, e, m: ["--config", _write(t / "bad.yaml", "a: [1, 2\nb: 3\n")], "invalid YAML"),
    "yaml not a mapping": (lambda t, e, m: ["--config", _write(t / "list.yaml", "- 1\n- 2\n")], "must be a mapping"),
    "unknown key": (lambda t, e, m: ["--config", _write(t / "k.yaml", "learning_rat: 0.1\n")],
                    "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    "invalid value": (lambda t, e, m: ["--set", "batch_size=0"], "batch_size"),
    "wrong type": (lambda t, e, m: ["--set", "num_epochs=many"], "num_epochs"),
    "bad data line": (lambda t, e, m: ["--data", _bad_data(t)], "bad.jsonl:2: field 'response': missing"),
    "missing data": (lambda t, e, m: ["--data", t / "none.jsonl"], "none.jsonl: file not found"),
    "missing model": (lambda t, e, m: ["--model", t / "no-model"], "model folder not found"),
    "not a model": (lambda t, e, m: ["--model", t], "config.json is missing"),
    "missing checkpoint": (lambda t, e, m: ["--resume", t / "step_9.safetensors"], "checkpoint not found"),
    "corrupt checkpoint": (lambda t, e, m: ["--resume", _write(t / "step_1.safetensors", "garbage")],
                           "cannot read checkpoint"),
    "bad lora key": (lambda t, e, m: ["--set", "lora.rnk=4"], "unknown key 'lora.rnk' (did you mean 'rank'?)"),
    "bad lora value": (lambda t, e, m: ["--set", "lora.rank=0"], "lora.rank must be an integer >= 1"),
    "bad wandb key": (lambda t, e, m: ["--set", "wandb.projct=x"], "unknown key 'wandb.projct' (did you mean 'project'?)"),
    "bad early stopping": (lambda t, e, m: ["--set", "early_stopping.patiense=2"], "early_stopping.patiense"),
    "usage": (lambda t, e, m: ["--max-steps", "ten"], "--max-steps"),
}


def _write(path, text):
    Path(path).write_text(text)
    return path


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_exit_2_with_one_line(case, tiny_dir, examples, tmp_path, capsys):
    extra, expected = ERROR_CASES[case]
    args = sft_args(tiny_dir, examples, tmp_path / "out", "--max-steps", 1) + extra(tmp_path, examples, tiny_dir)
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]


def test_checkpoint_of_another_model_is_a_clean_error(tiny_dir, examples, tmp_path, capsys):
    rc, _, err = run_cli(capsys, *sft_args(tiny_dir, examples, tmp_path / "lora", "--lora", "--max-steps", 1))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, *sft_args(tiny_dir, examples, tmp_path / "full", "--max-steps", 1, "--resume",
                                           tmp_path / "lora" / "checkpoints" / "final.safetensors"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "does not match this model" in err


@pytest.mark.parametrize("paradigm", ["grpo", "ppo"])
def test_rl_reward_errors(paradigm, tiny_dir, examples, tmp_path, capsys):
    if not available(paradigm):
        pytest.skip(f"no {paradigm.upper()} trainer in this checkout")
    base = ["train", paradigm, "--model", tiny_dir, "--data", examples / "prompts_train.jsonl", "--output",
            tmp_path / "o", "--max-steps", 1]
    f = _reward_file(tmp_path)
    for extra, expected in [([], "needs a reward function"),
                            (["--set", "reward=nope"], "module:function"),
                            (["--set", f"reward={tmp_path}/missing.py:f"], "reward file not found"),
                            (["--set", f"reward={f}:nothing"], "has no attribute 'nothing'"),
                            (["--set", "reward=no_such_module_xyz:f"], "cannot import reward module")]:
        rc, _, err = run_cli(capsys, *base, *extra)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err, (extra, err)


def test_train_without_paradigm_or_required_keys(tiny_dir, capsys):
    rc, _, err = run_cli(capsys, "train")
    assert rc == 2 and "sft" in err
    rc, _, err = run_cli(capsys, "train", "sft", "--model", tiny_dir)
    assert rc == 2 and "no data given" in err and len(err.strip().splitlines()) == 1


def test_key_of_another_paradigm_is_rejected(tiny_dir, examples, tmp_path, capsys):
    rc, _, err = run_cli(capsys, *sft_args(tiny_dir, examples, tmp_path, "--set", "reward=a:b"))
    assert rc == 2 and "'reward' is not used by `lazarus train sft`" in err


# ------------------------------------------------------------------------------ init-model, generate
def test_init_model_and_generate(tmp_path, capsys):
    d = tmp_path / "tiny"
    rc, out, err = run_cli(capsys, "init-model", d, "--hidden-size", 64, "--num-layers", 2)
    assert rc == 0, err
    assert json.loads((d / "config.json").read_text())["hidden_size"] == 64
    rc, _, err = run_cli(capsys, "init-model", d)
    assert rc == 2 and "--force" in err
    rc, out, err = run_cli(capsys, "generate", "--model", d, "--prompt", "What is 2+3?", "--max-tokens", 5)
    assert rc == 0, err
    assert out.endswith("\n")
    rc, _, err = run_cli(capsys, "generate", "--model", d, "--prompt", "hi", "--max-tokens", 0)
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_init_model_writes_published_shapes(tmp_path, capsys):
    """--arch/--dtype/--quantize-bits: a folder shaped like an mlx-community 4-bit checkpoint, which
    mlx-lm loads quantized; a width that cannot be quantized is one line, exit 2."""
    import mlx.nn as nn
    import mlx_lm

    d = tmp_path / "q4"
    rc, out, err = run_cli(capsys, "init-model", d, "--arch", "qwen2", "--dtype", "float16", "--quantize-bits", 4)
    assert rc == 0, err
    assert "(qwen2, float16, 4-bit)" in out
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["quantization"]["bits"] == 4
    model, _ = mlx_lm.load(str(d))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    rc, _, err = run_cli(capsys, "init-model", tmp_path / "odd", "--hidden-size", 40, "--quantize-bits", 4)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "quantize" in err
    rc, _, err = run_cli(capsys, "init-model", tmp_path / "x", "--arch", "gpt9")
    assert rc == 2 and "gpt9" in err


def test_generate_applies_chat_template(tiny_dir, monkeypatch, capsys):
    import mlx_lm

    seen = {}

    def fake_generate(model, tok, prompt, **kw):
        seen["prompt"] = tok.decode(prompt)
        seen["kw"] = kw
        return "5"

    monkeypatch.setattr(mlx_lm, "generate", fake_generate)
    rc, out, _ = run_cli(capsys, "generate", "--model", tiny_dir, "--prompt", "What is 2+3?", "--max-tokens", 7)
    assert rc == 0 and out == "5\n"
    assert seen["prompt"] == "<|user|>What is 2+3?<|end|><|assistant|>"
    assert seen["kw"]["max_tokens"] == 7


# ------------------------------------------------------------------------------ docs stay in sync
def _doc_table(md: str, heading: str) -> dict:
    """``{field: default cell}`` of the markdown table under ``heading``."""
    import re

    section = md.split(heading, 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)]
        if len(cells) >= 5 and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = cells[3]
    return rows


def test_training_guide_documents_every_field_with_its_default():
    from lazarus.training import DPOConfig, DPOTrainerConfig, SFTConfig

    md = (REPO / "docs" / "training.md").read_text()
    for heading, cls, nested in [("### SFTConfig", SFTConfig, False), ("### DPOTrainerConfig", DPOTrainerConfig, True),
                                 ("### DPOConfig", DPOConfig, False)]:
        table = _doc_table(md, heading)
        for name, field in cls.model_fields.items():
            assert name in table, f"docs/training.md {heading} lacks {name}"
            if nested and name == "dpo":
                continue
            default = field.default_factory() if field.default_factory else field.default
            assert table[name] == f"`{_fmt_default(default)}`", (heading, name, table[name])
        assert set(table) == set(cls.model_fields), (heading, set(table) ^ set(cls.model_fields))


def test_cli_doc_lists_every_run_key_and_readme_opens_with_title_sentence_and_make():
    md = (REPO / "docs" / "cli.md").read_text()
    for key in RUN_KEYS:
        assert f"| `{key}` |" in md, key
    title, sentence, commands = (REPO / "README.md").read_text().split("\n\n")[:3]
    assert title == "# Lazarus"
    assert "\n" not in sentence and sentence.endswith(".") and sentence.count(". ") == 0
    marker, commands = commands.split("\n", 1)  # the (invisible) docs-test marker, then the commands
    assert marker.startswith("<!-- docs-test: skip (") and commands == "```bash\nmake demo\nmake test\n```"
