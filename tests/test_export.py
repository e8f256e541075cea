"""Model folders out and runs that chain: `lazarus export`, a full fine-tune's `<output>/model`,
`--model <run folder>` (SFT -> DPO -> GRPO, full and LoRA), save_model_folder's dtype/4-bit rules."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from lazarus.data import chat_prompt_ids
from lazarus.models import adapters_disabled, load_model, save_adapters, save_model_folder, source_dir
from lazarus.models.export import source_tensors
from lazarus.models.precision import apply_precision
from lazarus.run_folder import write_model_folder
from lazarus.training.generation import generate_completions
from conftest import run_cli as cli

FAST = ["--set", "batch_size=4", "--set", "warmup_steps=0", "--set", "learning_rate=1e-2", "--set",
        "progress_bar=false", "--set", "checkpoint_interval=null"]
RL = ["--set", "group_size=2", "--set", "max_completion_length=4", "--set", "batch_size=2"]


def greedy(model, tok, prompts=("What is 7+5?", "What is 3+4?")):
    ids = [chat_prompt_ids(tok, p, None) for p in prompts]
    return generate_completions(model, tok, ids, max_tokens=6, temperature=0).completion_ids


def params(model):
    return dict(tree_flatten(model.parameters()))


def train(capsys, paradigm, model, data, out, *extra):
    rc, stdout, err = cli(capsys, "train", paradigm, "--model", model, "--data", data, "--output", out,
                          "--max-steps", 2, *FAST, *extra)
    assert rc == 0, err
    return stdout


def test_export_of_a_lora_run_generates_like_base_plus_adapters(tiny_dir, examples, tmp_path, capsys):
    run = tmp_path / "sft"
    stdout = train(capsys, "sft", tiny_dir, examples / "sft_train.jsonl", run, "--lora")
    assert f"lazarus export --adapter {run}" in stdout and not (run / "model").exists()
    rc, out, err = cli(capsys, "export", "--adapter", run, "--output", tmp_path / "fused")
    assert rc == 0, err
    assert "wrote" in out and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    from mlx_lm.utils import load as mlx_load

    fused, ftok = mlx_load(str(tmp_path / "fused"))
    base, tok = load_model(tiny_dir, adapter_path=run / "checkpoints")
    assert greedy(fused, ftok) == greedy(base, tok)
    x = mx.array([chat_prompt_ids(tok, "What is 7+5?", None)])
    assert mx.allclose(fused(x), base(x), atol=1e-4)
    assert ftok.chat_template == tok.chat_template
    # a checkpoint folder works too, with the base given explicitly
    rc, _, err = cli(capsys, "export", "--adapter", run / "checkpoints", "--model", tiny_dir, "--output",
                     tmp_path / "fused2")
    assert rc == 0, err
    assert mx.load(str(tmp_path / "fused2" / "model.safetensors")).keys() == params(fused).keys()


def test_full_fine_tune_writes_a_model_folder_mlx_lm_loads(tiny_dir, examples, tmp_path, capsys):
    run = tmp_path / "sft"
    stdout = train(capsys, "sft", tiny_dir, examples / "sft_train.jsonl", run)
    assert f"model: {run / 'model'}" in stdout
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "generation_config.json"} <= set(os.listdir(run / "model"))
    from mlx_lm import generate
    from mlx_lm.utils import load as mlx_load

    model, tok = mlx_load(str(run / "model"))
    text = generate(model, tok, prompt=chat_prompt_ids(tok, "What is 7+5?", None), max_tokens=4, verbose=False)
    assert isinstance(text, str)
    final = mx.load(str(run / "checkpoints" / "final.safetensors"))
    assert all(mx.array_equal(final[k], v) for k, v in params(model).items())
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and "quantization" not in cfg
    again, _ = load_model(run)  # the run folder stands for its model/
    assert source_dir(again) == run / "model"
    assert all(mx.array_equal(params(again)[k], v) for k, v in params(model).items())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_runs_chain_sft_dpo_grpo(lora, tiny_dir, examples, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative run folders, as a user types them
    (tmp_path / "rewards.py").write_text("def digits(prompts, completions, **kw):\n"
                                         "    return [float(sum(c.isdigit() for c in x)) for x in completions]\n")
    flag = ["--lora"] if lora else []
    train(capsys, "sft", tiny_dir, examples / "sft_train.jsonl", "sft", *flag)
    train(capsys, "dpo", "sft", examples / "preferences.jsonl", "dpo", *flag)
    train(capsys, "grpo", "dpo", examples / "prompts_train.jsonl", "grpo", *flag, *RL,
          "--set", "reward=rewards.py:digits")
    if not lora:
        for name in ("sft", "dpo", "grpo"):
            assert (tmp_path / name / "model" / "config.json").exists()
        import yaml

        assert yaml.safe_load(Path("grpo/config.yaml").read_text())["model"] == "dpo"
        sft, _ = load_model("sft")
        dpo, _ = load_model("dpo")
        assert any(not mx.array_equal(params(sft)[k], v) for k, v in params(dpo).items())
        return
    assert json.loads(Path("dpo/checkpoints/adapter_config.json").read_text())["model"] == "sft"
    # base + SFT adapters + DPO adapters + GRPO adapters, fused; twice the same way
    chained, tok = load_model("grpo")
    assert source_dir(chained) == Path(tiny_dir)
    rc, _, err = cli(capsys, "export", "--adapter", "grpo", "--output", "grpo_model")
    assert rc == 0, err
    exported, _ = load_model("grpo_model")
    assert all(mx.allclose(params(exported)[k], v, atol=1e-6) for k, v in params(chained).items())
    assert greedy(exported, tok) == greedy(chained, tok)
    sft_only, _ = load_model("sft")
    assert any(not mx.array_equal(params(sft_only)[k], v) for k, v in params(chained).items())
    # a LoRA stage on a LoRA run: adapters off (its reference model) is the earlier run's result
    policy, _ = load_model("sft", use_lora=True, lora_rank=4)
    x = mx.array([chat_prompt_ids(tok, "What is 7+5?", None)])
    with adapters_disabled(policy):
        assert mx.array_equal(policy(x), sft_only(x))


def test_export_errors_exit_2_with_one_line(tiny_dir, examples, tmp_path, capsys):
    full = tmp_path / "full"
    train(capsys, "sft", tiny_dir, examples / "sft_train.jsonl", full, "--max-steps", 1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / ".lazarus-run").touch()
    cases = [(["export", "--adapter", tmp_path / "nope", "--output", tmp_path / "o"], "adapter folder not found"),
             (["export", "--adapter", full, "--output", tmp_path / "o"], "holds no LoRA adapters"),
             (["export", "--adapter", tiny_dir, "--output", tmp_path / "o"], "holds no LoRA adapters"),
             (["generate", "--model", tmp_path / "unfinished", "--prompt", "hi"], "run folder without a model")]
    lora = tmp_path / "lora"
    train(capsys, "sft", tiny_dir, examples / "sft_train.jsonl", lora, "--lora", "--max-steps", 1)
    cases.append((["export", "--adapter", lora, "--output", tmp_path / "busy"], "already exists and is not empty"))
    for args, message in cases:
        rc, _, err = cli(capsys, *args)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "o").exists()


def test_only_a_finished_full_run_writes_its_model(tmp_path):
    saved = []
    trainer = SimpleNamespace(config=SimpleNamespace(dequantize="auto"),
                              save_model=lambda d, dequantize: saved.append((d, dequantize)) or d)

    def result(reason, **extras):
        return SimpleNamespace(stop_reason=reason, state=SimpleNamespace(extras=extras))

    assert write_model_folder(tmp_path, result("interrupted by SIGINT"), trainer, {}) is None
    assert write_model_folder(tmp_path, result("diverged", terminated_on_nan=True), trainer, {}) is None
    assert write_model_folder(tmp_path, result("max_steps reached (2)"), trainer, {"use_lora": True}) is None
    assert write_model_folder(tmp_path, result("early stopping: eval/loss"), trainer, {}) == tmp_path / "model"
    assert saved == [(tmp_path / "model", False)]


def _random_adapters(model, seed):
    model.update(tree_unflatten([(k, mx.random.normal(v.shape, key=mx.random.key(seed)) * 0.05)
                                 for k, v in tree_flatten(model.trainable_parameters())]))


def _quantized_bf16(tiny_dir, dest):
    """The tiny model as mlx_lm.convert(dtype=bfloat16, quantize=True, q_group_size=32) writes it."""
    from mlx_lm.utils import load as mlx_load, quantize_model, save_config, save_model

    model, _, config = mlx_load(str(tiny_dir), return_config=True)
    model.update(tree_unflatten([(k, v.astype(mx.bfloat16)) for k, v in tree_flatten(model.parameters())]))
    model, config = quantize_model(model, config, 32, 4)
    save_model(dest, model)
    save_config({**config, "torch_dtype": "bfloat16"}, dest / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(Path(tiny_dir) / f, dest)
    return dest


def test_4bit_bf16_base_stays_4bit_bf16_unless_dequantized(tiny_dir, tmp_path):
    from mlx_lm.utils import load as mlx_load

    base = _quantized_bf16(tiny_dir, tmp_path / "q4")
    model, tok = load_model(base, use_lora=True, lora_rank=4)
    precision = apply_precision(model, dtype="float32", dequantize=True)  # CPU training: float32, no 4-bit
    _random_adapters(model, 1)
    out = save_model_folder(model, tok, tmp_path / "out", dtype=precision.save)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["quantization"]["bits"] == 4
    written, original = source_tensors(out), source_tensors(base)
    assert written.keys() == original.keys() and {d for d, _ in written.values()} == {"U32", "BF16"}
    a, b = mx.load(str(base / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert mx.array_equal(a["model.embed_tokens.scales"], b["model.embed_tokens.scales"])  # untouched: exact
    assert not mx.array_equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
    loaded, _ = mlx_load(str(out))
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    plain = save_model_folder(model, tok, tmp_path / "plain", dequantize=True)
    cfg = json.loads((plain / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    x = mx.array([[5, 6, 7, 8]])
    assert mx.allclose(mlx_load(str(plain))[0](x), model(x), atol=0.15)


def test_export_of_a_4bit_base_matches_mlx_lm_fuse(tiny_dir, tmp_path, capsys):
    from mlx_lm.utils import load as mlx_load

    base = _quantized_bf16(tiny_dir, tmp_path / "q4")
    model, _ = load_model(base, use_lora=True, lora_rank=4)
    _random_adapters(model, 2)
    save_adapters(model, tmp_path / "adapters")
    rc, _, err = cli(capsys, "export", "--adapter", tmp_path / "adapters", "--output", tmp_path / "q_out")
    assert rc == 0, err
    # what mlx_lm.fuse computes: load with adapters, LoRALinear.fuse() every layer
    ref, _ = mlx_load(str(base), adapter_path=str(tmp_path / "adapters"))
    ref.update_modules(tree_unflatten([(n, m.fuse()) for n, m in ref.named_modules() if hasattr(m, "fuse")]))
    written = mx.load(str(tmp_path / "q_out" / "model.safetensors"))
    assert written.keys() == params(ref).keys()
    assert all(mx.array_equal(written[k], v) for k, v in params(ref).items())
    rc, _, err = cli(capsys, "export", "--adapter", tmp_path / "adapters", "--output", tmp_path / "dq", "--dequantize")
    assert rc == 0, err
    assert "quantization" not in json.loads((tmp_path / "dq" / "config.json").read_text())
    assert not any(k.endswith(".scales") for k in source_tensors(tmp_path / "dq"))


def test_large_models_are_sharded_like_mlx_lm(tiny_dir, tmp_path, monkeypatch):
    import mlx_lm.utils
    from mlx_lm.utils import load as mlx_load

    make_shards = mlx_lm.utils.make_shards
    monkeypatch.setattr(mlx_lm.utils, "make_shards", lambda w: make_shards(w, max_file_size_gb=0))  # 1 tensor each
    model, tok = load_model(tiny_dir)
    out = save_model_folder(model, tok, tmp_path / "sharded")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) == len(params(model)) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    loaded, _ = mlx_load(str(out))
    assert all(mx.array_equal(params(loaded)[k], v) for k, v in params(model).items())


def test_a_failed_write_leaves_the_old_folder_or_nothing(tiny_dir, tmp_path):
    model, tok = load_model(tiny_dir)
    out = save_model_folder(model, tok, tmp_path / "m")
    before = sorted(os.listdir(out))

    class Broken:
        def save_pretrained(self, path):
            raise OSError(28, "No space left on device")

    for target in (out, tmp_path / "new"):
        with pytest.raises(OSError):
            save_model_folder(model, Broken(), target)
    assert sorted(os.listdir(out)) == before and not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    save_model_folder(model, tok, out)  # replacing a complete folder leaves nothing beside it
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and sorted(os.listdir(out)) == before
