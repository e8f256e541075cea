"""The dtype policy on published-style checkpoints: bf16 and 4-bit (float16 scales) models train in
float32 on the CPU backend, save in their own dtype, resume exactly; 4-bit full fine-tuning is refused."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lazarus import checkpointing as ckpt
from lazarus.models import load_model
from lazarus.models.precision import PrecisionError, apply_precision, parameter_counts, quantized_modules
from lazarus.training import SFTConfig, SFTTrainer


def _published(src, dst, dtype, bits=None):
    """``src`` (float32 tiny model) re-saved as a hub checkpoint would be: bf16, or 4-bit with float16
    scales/biases (mlx_lm.convert's layout)."""
    import mlx_lm.utils as U

    model, tok = U.load(str(src))
    config = json.loads((src / "config.json").read_text())
    model.set_dtype(dtype)
    if bits:
        model, config = U.quantize_model(model, config, 32, bits)
    config["torch_dtype"] = {mx.bfloat16: "bfloat16", mx.float16: "float16"}[dtype]
    U.save(dst, src, model, tok, config)
    return dst


@pytest.fixture(scope="module")
def published(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {"bf16": _published(tiny_dir, root / "bf16", mx.bfloat16),
            "q4": _published(tiny_dir, root / "q4", mx.float16, bits=4)}


def _config(tmp_path, **kw):
    base = dict(max_steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=0, log_interval=1,
                checkpoint_dir=str(tmp_path / "ck"), checkpoint_interval=2, compile=True)
    return SFTConfig(**{**base, **kw})


def _dtypes(tree):
    return {v.dtype for _, v in tree_flatten(tree) if mx.issubdtype(v.dtype, mx.floating)}


def test_bf16_full_fine_tune_computes_float32_saves_bf16_and_resumes_exactly(published, examples, tmp_path):
    model, tok = load_model(published["bf16"])
    assert _dtypes(model.parameters()) == {mx.bfloat16}
    trainer = SFTTrainer(model, tok, _config(tmp_path))
    result = trainer.train(examples / "sft_train.jsonl")
    assert trainer.precision.describe() == "computes in float32, saves bfloat16"
    assert _dtypes(model.parameters()) == {mx.float32}  # trained in float32 on the CPU backend
    weights, _ = ckpt.read_weights(tmp_path / "ck" / "final.safetensors")
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    info = result.state.run_info
    assert info["trainable_parameters"] == info["total_parameters"] > 0 and info["examples"] > 0
    # K steps + resume == N steps straight, although the weights file holds bf16
    straight = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    model2, _ = load_model(published["bf16"])
    resumed = SFTTrainer(model2, tok, _config(tmp_path / "r", max_steps=4))
    resumed.train(examples / "sft_train.jsonl", resume_from=tmp_path / "ck" / "step_2.safetensors")
    again = {k: np.array(v) for k, v in tree_flatten(model2.trainable_parameters())}
    assert all(np.array_equal(straight[k], again[k]) for k in straight)
    assert [h["loss"] for h in resumed.loop.state.history if "loss" in h][-2:] == \
        [h["loss"] for h in result.history if "loss" in h][-2:]


def test_4bit_lora_dequantizes_on_cpu_and_adapters_load_on_the_quantized_base(published, examples, tmp_path):
    import mlx_lm

    model, tok = load_model(published["q4"], use_lora=True, lora_rank=4)
    quantized = quantized_modules(model)
    assert quantized and {m.scales.dtype for _, m in quantized} == {mx.float16}
    trainable_before, total_before = parameter_counts(model)
    trainer = SFTTrainer(model, tok, _config(tmp_path, learning_rate=1e-2))
    trainer.train(examples / "sft_train.jsonl")
    assert quantized_modules(model) == [] and _dtypes(model.parameters()) == {mx.float32}
    assert parameter_counts(model) == (trainable_before, total_before)  # same parameters, only dequantized
    assert "4-bit base: %d layers dequantized" % len(quantized) in trainer.precision.describe()
    adapters = mx.load(str(tmp_path / "ck" / "adapters.safetensors"))
    assert {v.dtype for v in adapters.values()} == {mx.float16}  # the published dtype
    # mlx-lm loads the adapters on the original 4-bit base, and they change its greedy output
    base, tok2 = mlx_lm.load(str(published["q4"]))
    tuned, _ = mlx_lm.load(str(published["q4"]), adapter_path=str(tmp_path / "ck"))
    prompt = [1, 2, 3, 4]
    logits_base = base(mx.array([prompt]))[0, -1]
    logits_tuned = tuned(mx.array([prompt]))[0, -1]
    assert mx.isfinite(logits_tuned).all().item() and not mx.allclose(logits_base, logits_tuned).item()


def test_resume_keeps_the_dequantize_auto_decision_of_its_checkpoint(published, examples, tmp_path, monkeypatch):
    """`dequantize: auto` decides by this machine's free memory; a resume on a machine (or a moment)
    with less memory must still run the checkpoint's choice, or it would train other math. The
    decision travels in the resume state; K steps + resume == N steps."""
    from lazarus.models import precision

    model, tok = load_model(published["q4"], use_lora=True, lora_rank=4)
    straight = SFTTrainer(model, tok, _config(tmp_path))
    result = straight.train(examples / "sft_train.jsonl")
    assert straight.precision.dequantized_layers > 0  # plenty of memory here
    doc = ckpt.peek_state_doc(tmp_path / "ck" / "step_2.safetensors")
    assert doc["trainer"]["precision"] == {"dequantized": [True]}  # one decision per model: only the trained one
    monkeypatch.setattr(precision, "_available_memory", lambda: 1)  # now `auto` alone would keep 4-bit
    model2, _ = load_model(published["q4"], use_lora=True, lora_rank=4)
    fresh = SFTTrainer(model2, tok, _config(tmp_path / "fresh", max_steps=1))
    fresh.apply_precision()
    assert fresh.precision.dequantized_layers == 0  # what a fresh run would choose with that memory
    model3, _ = load_model(published["q4"], use_lora=True, lora_rank=4)
    resumed = SFTTrainer(model3, tok, _config(tmp_path / "r"))
    resumed.train(examples / "sft_train.jsonl", resume_from=tmp_path / "ck" / "step_2.safetensors")
    assert resumed.precision.dequantized_layers == straight.precision.dequantized_layers
    assert [h["loss"] for h in resumed.loop.state.history if "loss" in h][-2:] == \
        [h["loss"] for h in result.history if "loss" in h][-2:]
    assert ckpt.peek_state_doc(tmp_path / "nothing.safetensors") is None
    # precision applied before the resume (here with auto deciding otherwise): the run says so
    model4, _ = load_model(published["q4"], use_lora=True, lora_rank=4)
    early = SFTTrainer(model4, tok, _config(tmp_path / "early"))
    early.apply_precision()
    with pytest.warns(UserWarning, match=r"dequantized as \[True\], this run's as \[False\]"):
        early.train(examples / "sft_train.jsonl", resume_from=tmp_path / "ck" / "step_2.safetensors")


def test_resume_keeps_each_models_dequantize_decision_and_survives_a_damaged_header(published, examples, tmp_path,
                                                                                    monkeypatch):
    """A frozen 4-bit reference model's own decision is saved and kept too; a checkpoint whose
    header is damaged is reported by restore, not by the peek."""
    from lazarus.models import precision
    from lazarus.training import DPOTrainer, DPOTrainerConfig

    def dpo(root, max_steps=4):
        policy, tok = load_model(published["q4"], use_lora=True, lora_rank=4)
        reference, _ = load_model(published["q4"])
        cfg = DPOTrainerConfig(max_steps=max_steps, batch_size=2, learning_rate=1e-3, warmup_steps=0, log_interval=1,
                               checkpoint_dir=str(root / "ck"), checkpoint_interval=2, target_reward_margin=None)
        return DPOTrainer(policy, reference, tok, cfg)

    first = dpo(tmp_path)
    first.train(examples / "preferences.jsonl")
    assert first._dequantize_decisions() == [True, True]
    step2 = tmp_path / "ck" / "step_2.safetensors"
    assert ckpt.peek_state_doc(step2)["trainer"]["precision"] == {"dequantized": [True, True]}
    monkeypatch.setattr(precision, "_available_memory", lambda: 1)
    resumed = dpo(tmp_path / "r")
    resumed.train(examples / "preferences.jsonl", resume_from=step2)
    assert resumed._dequantize_decisions() == [True, True]
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes((2).to_bytes(8, "little") + b"[]")  # a header that is JSON but not an object
    assert ckpt.peek_state_doc(damaged) is None
    with pytest.raises(ckpt.CheckpointError):
        dpo(tmp_path / "d").train(examples / "preferences.jsonl", resume_from=damaged)


def test_dequantize_false_keeps_4bit_layers_with_float32_scales(published):
    model, _ = load_model(published["q4"], use_lora=True, lora_rank=4)
    precision = apply_precision(model, dequantize=False)
    quantized = quantized_modules(model)
    assert precision.dequantized_layers == 0 and len(quantized) == precision.quantized_layers > 0
    assert {m.scales.dtype for _, m in quantized} == {mx.float32}
    assert {m.weight.dtype for _, m in quantized} == {mx.uint32}


def test_explicit_bfloat16_computes_in_bfloat16_and_lora_does_not_hide_the_base_dtype(published):
    model, _ = load_model(published["bf16"], use_lora=True, lora_rank=4)
    precision = apply_precision(model, dtype="bfloat16")
    assert precision.compute == mx.bfloat16 and _dtypes(model.parameters()) == {mx.bfloat16, mx.float32}
    assert _dtypes(model.trainable_parameters()) == {mx.float32}  # LoRA matrices stay float32, as in mlx-lm
    assert mx.bfloat16 not in _dtypes(model.trainable_parameters())
    model, _ = load_model(published["bf16"], use_lora=True, lora_rank=64)  # LoRA matrices are float32
    assert apply_precision(model).describe() == "computes in float32, saves bfloat16"


def test_full_fine_tuning_a_4bit_model_is_refused(published, examples, tmp_path):
    model, tok = load_model(published["q4"])
    with pytest.raises(PrecisionError, match="use LoRA .*dequantize: true"):
        SFTTrainer(model, tok, _config(tmp_path)).train(examples / "sft_train.jsonl")
    # dequantize: true trains every weight, and the run says so
    model, tok = load_model(published["q4"])
    trainer = SFTTrainer(model, tok, _config(tmp_path / "d", dequantize=True, max_steps=1))
    trainer.train(examples / "sft_train.jsonl")
    trainable, total = parameter_counts(model)
    assert trainable == total and quantized_modules(model) == []


def test_cli_refuses_4bit_full_fine_tuning_with_exit_2_and_prints_what_trains(published, examples, tmp_path):
    cmd = [sys.executable, "-m", "lazarus", "train", "sft", "--model", str(published["q4"]),
           "--data", str(examples / "sft_train.jsonl"), "--output", str(tmp_path / "run"), "--max-steps", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--lora" in p.stderr and "dequantize: true" in p.stderr, p.stderr[-2000:]
    p = subprocess.run(cmd[:-4] + ["--output", str(tmp_path / "run2"), "--max-steps", "1", "--lora"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert "Trainable parameters:" in out and "computes in float32, saves float16" in out
    assert "LoRA: rank" in out and "examples" in out and "tokens" in out
