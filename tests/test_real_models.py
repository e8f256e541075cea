"""Published checkpoints end to end, offline: mlx-lm's own llama, qwen2 (q/k/v bias), qwen3 (q/k norms,
head_dim decoupled from the width), phi3 (fused qkv/gate_up, LongRoPE) and gemma3 (sliding-window
layers with rotating caches) classes, as bfloat16 weights or 4-bit with float16 scales (the
mlx-community layout), with tied and untied embeddings. Each is loaded as published, trained a couple
of steps (SFT, DPO, GRPO, PPO with LoRA; full SFT of the bf16 ones), saved, reloaded into a fresh
load and asked for a few tokens."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lazarus.checkpointing import read_weights
from lazarus.models import fast_cpu, load_model
from lazarus.models.precision import PrecisionError
from lazarus.training import (DPOTrainer, DPOTrainerConfig, GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer,
                              SFTConfig, SFTTrainer)
from lazarus.training.generation import generate_completions

#: (architecture, weights, tied embeddings): every architecture as bf16 and as 4-bit, tied once and untied once.
CASES = [("llama", "bf16", False), ("llama", "q4", True),
         ("qwen2", "bf16", True), ("qwen2", "q4", False),
         ("qwen3", "bf16", False), ("qwen3", "q4", True),
         ("phi3", "bf16", False), ("phi3", "q4", True),
         ("gemma3", "bf16", True), ("gemma3", "q4", False)]
BF16 = [c for c in CASES if c[1] == "bf16"]
BASE = {"bf16": mx.bfloat16, "q4": mx.float16}
LORA = dict(use_lora=True, lora_rank=4)
#: A couple of steps each. The fast CPU kernels are forced on (not measured per machine): every architecture's
#: attention and MLP run through them on the CPU backend.
STEPS = dict(max_steps=2, log_interval=1, warmup_steps=0, learning_rate=1e-3, checkpoint_interval=None,
             fast_cpu_kernels=True)


@pytest.fixture
def folder(model_zoo, request):
    arch, weights, tie = request.param
    return model_zoo(arch, "bfloat16" if weights == "bf16" else "float16", 4 if weights == "q4" else None, tie)


def cases(selection=CASES):
    return pytest.mark.parametrize("folder, case", [(c, c) for c in selection], indirect=["folder"],
                                   ids=[f"{a}-{w}-{'tied' if t else 'untied'}" for a, w, t in selection])


def subset(tmp_path, examples, name, n):
    """The first ``n`` lines of a shipped example file (a couple of steps need no more)."""
    path = tmp_path / f"{n}-{name}"
    path.write_text("".join(line + "\n" for line in (examples / name).read_text().splitlines()[:n]))
    return path


def floating(weights: dict) -> set:
    return {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}


def length_reward(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]


def prompts_of_several_lengths(tok):
    return [tok.encode("What is 12+7? Answer with one number, please."), tok.encode("What is 2+4?"), tok.encode("7")]


def check_generates(model, tok, max_tokens=4):
    """Greedy batched generation from left-padded prompts: tokens within the vocabulary, finite log-probs."""
    comps = generate_completions(model, tok, prompts_of_several_lengths(tok), max_tokens=max_tokens, temperature=0.0)
    vocab = model.args.vocab_size
    for ids, lps in zip(comps.completion_ids, comps.logprobs):
        assert 1 <= len(ids) <= max_tokens and all(0 <= t < vocab for t in ids)
        assert all(math.isfinite(v) for v in lps), lps
    return comps


def check_checkpoint(trainer, ck_dir, base_dtype, lora: bool):
    """final.safetensors holds the trainable weights in the base model's dtype."""
    saved, _ = read_weights(ck_dir / "final.safetensors")
    trainable = {k for k, _ in tree_flatten(trainer.train_module().trainable_parameters())}
    assert set(saved) == trainable
    if lora:
        assert all(k.endswith((".lora_a", ".lora_b")) or k.startswith("value_head.") for k in saved)
    assert floating(saved) == {base_dtype}, floating(saved)
    return saved


def reload_and_generate(trainer_cls, folder, tok, config, ck_dir, saved, lora: bool, **extra):
    """A fresh load (as published) gets the trained weights through ``trainer.load_checkpoint``, in the
    fresh model's dtypes (LoRA's float32, the base's bf16...)."""
    model, tok = load_model(folder, **(LORA if lora else {}))
    trainer = trainer_cls(model=model, tokenizer=tok, config=config, **extra)
    fresh = dict(tree_flatten(trainer.train_module().parameters()))
    trainer.load_checkpoint(ck_dir / "final.safetensors")
    loaded = dict(tree_flatten(trainer.train_module().parameters()))
    for k, v in saved.items():
        assert loaded[k].dtype == fresh[k].dtype, k
        np.testing.assert_array_equal(np.array(loaded[k].astype(mx.float32)), np.array(v.astype(mx.float32)),
                                      err_msg=k)
    check_generates(model, tok)
    return model


# ------------------------------------------------------------------------------------ the folders
@cases()
def test_loads_as_published(folder, case):
    from mlx_lm.utils import load as mlx_load

    arch, weights, tie = case
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json"} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == ("bfloat16" if weights == "bf16" else "float16")
    assert config["tie_word_embeddings"] is tie
    if weights == "q4":
        q4 = {"group_size": 64, "bits": 4, "mode": "affine"}
        assert config["quantization"] == config["quantization_config"] == q4
    else:
        assert "quantization" not in config

    model, tok = load_model(folder)
    params = dict(tree_flatten(model.parameters()))
    assert ("lm_head.weight" in params) is (not tie)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    if weights == "bf16":
        assert floating(params) == {mx.bfloat16}
        assert all(type(m) is nn.Linear for _, m in linears)
    else:  # every projection and the embedding stay 4-bit, with float16 scales and biases
        assert floating(params) == {mx.float16}
        assert all(isinstance(m, nn.QuantizedLinear) and m.bits == 4 and m.group_size == 64 for _, m in linears)
        assert all(m.scales.dtype == m.biases.dtype == mx.float16 for _, m in linears)
        assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    block = model.layers[0]
    if arch == "qwen2":
        assert "bias" in block.self_attn.q_proj and "bias" not in block.self_attn.o_proj
    if arch in ("qwen3", "gemma3"):
        # heads x head_dim (4 x 32) is not the width (64), as in the published Qwen3 and Gemma 3
        assert "q_norm" in block.self_attn and block.self_attn.q_proj.weight.shape[0] == 128
    if arch == "phi3":
        assert "qkv_proj" in block.self_attn and "gate_up_proj" in block.mlp
    if arch == "gemma3":
        from mlx_lm.models.cache import RotatingKVCache
        assert any(isinstance(c, RotatingKVCache) for c in model.make_cache())

    x = mx.array([tok.encode("What is 2+4? hello world")])
    logits = model(x)
    assert logits.shape == (1, x.shape[1], model.args.vocab_size)
    assert np.isfinite(np.array(logits.astype(mx.float32))).all()
    reference, _ = mlx_load(str(folder))
    np.testing.assert_array_equal(np.array(logits.astype(mx.float32)), np.array(reference(x).astype(mx.float32)))

    lora_model, _ = load_model(folder, **LORA)
    trainable = dict(tree_flatten(lora_model.trainable_parameters()))
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    # every projection of every block gets an adapter (phi3: the fused qkv_proj and gate_up_proj)
    in_blocks = {n for n, _ in linears if n.startswith("model.layers.")}
    assert {n for n, m in lora_model.named_modules() if hasattr(m, "lora_a")} == in_blocks
    if weights == "q4":  # LoRA wraps the 4-bit layers, it does not replace them
        wrapped = [m.linear for _, m in lora_model.named_modules() if hasattr(m, "lora_a")]
        assert wrapped and all(isinstance(m, nn.QuantizedLinear) for m in wrapped)


@cases()
def test_batched_generation_matches_one_row_at_a_time(folder, case):
    """Left-padded batch caches (gemma3: rotating ones, past its 16-token window) give mlx-lm's own greedy
    tokens. In float32 (4-bit layers kept, scales upcast): bf16 rounding differs between batch shapes, and
    a random model's near-ties would flip."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, tok = load_model(folder)
    model.set_dtype(mx.float32)
    prompts = prompts_of_several_lengths(tok)
    comps = generate_completions(model, tok, prompts, max_tokens=20, temperature=0.0)
    for p, ids in zip(prompts, comps.completion_ids):
        alone = []
        for (t, _), _ in zip(generate_step(mx.array(p), model, max_tokens=20, sampler=make_sampler(0.0)), range(20)):
            alone.append(int(t))
            if int(t) in tok.eos_token_ids:
                break
        assert ids == alone


# ------------------------------------------------------------------------------------ training
@cases()
def test_sft_lora(folder, case, tmp_path, examples):
    from mlx_lm import generate as mlx_generate
    from mlx_lm.utils import load as mlx_load

    arch, weights, tie = case
    model, tok = load_model(folder, **LORA)
    config = SFTConfig(batch_size=4, checkpoint_dir=str(tmp_path / "ck"), **STEPS)
    trainer = SFTTrainer(model, tok, config)
    result = trainer.train(subset(tmp_path, examples, "sft_train.jsonl", 8))
    assert len(result.history) == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    p = trainer.precision  # on the CPU backend: float32 compute, 4-bit layers dequantized, files in the base dtype
    assert p.base == p.save == BASE[weights] and p.compute == mx.float32
    assert p.dequantized_layers == p.quantized_layers and (p.quantized_layers > 0) is (weights == "q4")
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    saved = check_checkpoint(trainer, tmp_path / "ck", BASE[weights], lora=True)
    adapters, _ = read_weights(tmp_path / "ck" / "adapters.safetensors")
    assert set(adapters) == set(saved) and floating(adapters) == {BASE[weights]}

    reloaded = reload_and_generate(SFTTrainer, folder, tok, config, tmp_path / "ck", saved, lora=True)
    if weights == "q4":  # loading a checkpoint leaves the published 4-bit layers as they are
        assert isinstance(reloaded.layers[0].mlp.down_proj.linear, nn.QuantizedLinear)
    # adapters fused into the base, written as a model folder (4-bit bases dequantized: re-quantizing moves
    # a random tiny model's logits too far for a comparison)
    exported, _ = load_model(trainer.save_model(tmp_path / "model", dequantize=weights == "q4"))
    assert floating(dict(tree_flatten(exported.parameters()))) == {BASE[weights]}
    check_same_logits(exported, model, tok)
    # the adapters change the model, and mlx-lm loads them too
    base, _ = load_model(folder)
    x = mx.array([tok.encode("What is 2+4?")])
    assert not np.allclose(np.array(reloaded(x).astype(mx.float32)), np.array(base(x).astype(mx.float32)))
    mlx_model, mlx_tok = mlx_load(str(folder), adapter_path=str(tmp_path / "ck"))
    theirs = dict(tree_flatten(mlx_model.parameters()))
    for k, v in adapters.items():
        assert theirs[k].dtype == v.dtype and mx.array_equal(theirs[k], v).item(), k
    # same weights; mlx-lm keeps the bf16/fp16 adapter dtype, a Lazarus reload computes LoRA in float32
    check_same_logits(mlx_model, reloaded, tok)
    assert isinstance(mlx_generate(mlx_model, mlx_tok, "What is 2+4?", max_tokens=3), str)


@cases()
def test_dpo_lora(folder, case, tmp_path, examples):
    """bf16: the reference is the policy with adapters off; 4-bit: a second load of the folder."""
    arch, weights, tie = case
    model, tok = load_model(folder, **LORA)
    reference = load_model(folder)[0] if weights == "q4" else None
    config = DPOTrainerConfig(batch_size=4, checkpoint_dir=str(tmp_path / "ck"), **STEPS)
    trainer = DPOTrainer(model, reference, tok, config)
    result = trainer.train(subset(tmp_path, examples, "preferences.jsonl", 8))
    assert len(result.history) == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    if reference is not None:  # the reference computes like the policy and is never trained
        assert floating(dict(tree_flatten(reference.parameters()))) == {mx.float32}
        assert not tree_flatten(reference.trainable_parameters())
    saved = check_checkpoint(trainer, tmp_path / "ck", BASE[weights], lora=True)
    reload_and_generate(DPOTrainer, folder, tok, config, tmp_path / "ck", saved, lora=True)


@cases()
def test_grpo_lora(folder, case, tmp_path, examples):
    arch, weights, tie = case
    model, tok = load_model(folder, **LORA)
    config = GRPOConfig(batch_size=2, group_size=2, max_completion_length=4, beta=0.05,
                        checkpoint_dir=str(tmp_path / "ck"), **STEPS)
    trainer = GRPOTrainer(model, tok, config, reward_fn=length_reward)
    result = trainer.train(subset(tmp_path, examples, "prompts_train.jsonl", 4))
    assert len(result.history) == 2
    for h in result.history:
        assert all(math.isfinite(h[k]) for k in ("loss", "reward", "kl", "completions/mean_length"))
    saved = check_checkpoint(trainer, tmp_path / "ck", BASE[weights], lora=True)
    reload_and_generate(GRPOTrainer, folder, tok, config, tmp_path / "ck", saved, lora=True, reward_fn=length_reward)


@cases()
def test_ppo_lora(folder, case, tmp_path, examples):
    """The value head reads the final hidden states whether the logits come from lm_head or the tied embedding."""
    arch, weights, tie = case
    model, tok = load_model(folder, **LORA)
    config = PPOConfig(batch_size=2, group_size=2, max_completion_length=4, ppo_epochs=1, beta=0.05,
                       checkpoint_dir=str(tmp_path / "ck"), **STEPS)
    trainer = PPOTrainer(model, tok, config, reward_fn=length_reward)
    result = trainer.train(subset(tmp_path, examples, "prompts_train.jsonl", 4))
    assert len(result.history) == 2
    for h in result.history:
        assert all(math.isfinite(h[k]) for k in ("loss", "value_loss", "reward", "kl"))
    x = mx.array([tok.encode("What is 2+4?")])
    logits, values = trainer.value_model.logits_and_values(x)
    np.testing.assert_allclose(np.array(logits), np.array(model(x)), atol=1e-5)
    assert values.shape == x.shape and float(mx.abs(values).max()) > 0  # the head learned
    saved = check_checkpoint(trainer, tmp_path / "ck", BASE[weights], lora=True)
    assert {"value_head.weight", "value_head.bias"} <= set(saved)
    reload_and_generate(PPOTrainer, folder, tok, config, tmp_path / "ck", saved, lora=True, reward_fn=length_reward)


@cases(BF16)
def test_full_sft_of_bf16_models(folder, case, tmp_path, examples):
    model, tok = load_model(folder)
    config = SFTConfig(batch_size=4, checkpoint_dir=str(tmp_path / "ck"), **STEPS)
    trainer = SFTTrainer(model, tok, config)
    result = trainer.train(subset(tmp_path, examples, "sft_train.jsonl", 8))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    saved = check_checkpoint(trainer, tmp_path / "ck", mx.bfloat16, lora=False)
    assert set(saved) == {k for k, _ in tree_flatten(load_model(folder)[0].parameters())}  # every weight
    reloaded = reload_and_generate(SFTTrainer, folder, tok, config, tmp_path / "ck", saved, lora=False)
    assert floating(dict(tree_flatten(reloaded.parameters()))) == {mx.bfloat16}
    # the trained model as a model folder of the same architecture, still bf16, still tied or untied
    exported, _ = load_model(trainer.save_model(tmp_path / "model"))
    assert dict(tree_flatten(exported.parameters())).keys() == saved.keys()
    check_same_logits(exported, model, tok)


def check_same_logits(model, reference, tok):
    """Up to half-precision rounding (a float32-computed model against its bf16/fp16 copy)."""
    x = mx.array([tok.encode("What is 2+4? hello")])
    ours, theirs = np.array(model(x).astype(mx.float32)), np.array(reference(x).astype(mx.float32))
    assert np.abs(ours - theirs).max() <= 0.05 * np.abs(theirs).max()


def test_full_fine_tuning_a_4bit_model_needs_lora_or_dequantize(model_zoo, tmp_path, examples):
    folder = model_zoo("qwen2", "float16", 4, tie=False)
    data = subset(tmp_path, examples, "sft_train.jsonl", 8)
    for dequantize in (False, "auto"):
        model, tok = load_model(folder)
        config = SFTConfig(batch_size=4, checkpoint_dir=str(tmp_path / "refused"), dequantize=dequantize, **STEPS)
        with pytest.raises(PrecisionError, match="LoRA"):
            SFTTrainer(model, tok, config).train(data)
    model, tok = load_model(folder)
    trainer = SFTTrainer(model, tok, SFTConfig(batch_size=4, checkpoint_dir=str(tmp_path / "ck"), dequantize=True,
                                               **STEPS))
    trainer.train(data)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    saved = check_checkpoint(trainer, tmp_path / "ck", mx.float16, lora=False)
    assert saved["lm_head.weight"].shape == (model.args.vocab_size, 64)  # full-size weights, no packed ones
    assert "model.layers.0.self_attn.q_proj.bias" in saved and not any(k.endswith(".scales") for k in saved)
    check_generates(model, tok)


# ------------------------------------------------------------------------------------ known bugs
def test_ppo_full_fine_tuning_of_a_dequantized_untied_model_trains_lm_head(model_zoo, tmp_path, examples):
    folder = model_zoo("llama", "float16", 4, tie=False)
    model, tok = load_model(folder)
    config = PPOConfig(batch_size=2, group_size=2, max_completion_length=4, ppo_epochs=1, dequantize=True,
                       checkpoint_dir=str(tmp_path / "ck"), **STEPS)
    trainer = PPOTrainer(model, tok, config, reward_fn=length_reward)
    trainer.train(subset(tmp_path, examples, "prompts_train.jsonl", 4))
    saved, _ = read_weights(tmp_path / "ck" / "final.safetensors")
    assert "lm_head.weight" in saved


def test_fast_cpu_kernels_generate_like_mlx_from_left_padded_prompts(model_zoo):
    model, tok = load_model(model_zoo("llama", "bfloat16", None, tie=True))
    prompts = prompts_of_several_lengths(tok)
    native = generate_completions(model, tok, prompts, max_tokens=6, temperature=0.0)
    with fast_cpu.fast_cpu_kernels(model, True):
        fast = generate_completions(model, tok, prompts, max_tokens=6, temperature=0.0)
    assert all(math.isfinite(v) for lps in fast.logprobs for v in lps)
    assert fast.completion_ids == native.completion_ids

