"""load_model, LoRA, and adapter compatibility with mlx-lm in both directions."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lazarus.models import ModelLoadError, create_tiny_model, load_model, save_adapters


def logits(model, tok, text="What is 2+3?"):
    ids = mx.array([list(tok.encode(text, add_special_tokens=False))])
    return np.array(model(ids))


def test_tiny_model_loads_with_lazarus_and_mlx_lm(tiny_dir):
    from mlx_lm.utils import load as mlx_load

    model, tok = load_model(tiny_dir)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert 50_000 < n < 5_000_000
    assert tok.eos_token_id is not None and tok.chat_template
    ref_model, _ = mlx_load(str(tiny_dir))
    np.testing.assert_array_equal(logits(model, tok), logits(ref_model, tok))


def test_default_tiny_model_size(tmp_path):
    create_tiny_model(tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert 300_000 < n < 3_000_000


def test_loads_a_folder_written_by_mlx_lm_convert_quantized(tiny_dir, tmp_path):
    from mlx_lm.convert import convert

    out = tmp_path / "mlx_q"
    convert(str(tiny_dir), str(out), quantize=True, q_group_size=32, q_bits=4)
    model, tok = load_model(out, use_lora=True, lora_rank=2)
    assert np.isfinite(logits(model, tok)).all()
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)


def test_lora_freezes_exactly_the_base(tiny_dir):
    model, _ = load_model(tiny_dir, use_lora=True, lora_rank=4)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    all_params = dict(tree_flatten(model.parameters()))
    lora = {k for k in all_params if k.endswith(("lora_a", "lora_b"))}
    assert set(trainable) == lora
    # attention and MLP projections of every block are covered by default
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(k.endswith(f"layers.1.{'self_attn' if proj[0] in 'qkvo' else 'mlp'}.{proj}.lora_a") for k in lora), proj
    # lora_b starts at zero: the LoRA model computes exactly the base model
    base, tok = load_model(tiny_dir)
    np.testing.assert_allclose(logits(model, tok), logits(base, tok), atol=1e-6)
    # options reach the layers
    m2, _ = load_model(tiny_dir, use_lora=True, lora_rank=2, lora_layers=1, lora_keys=["self_attn.q_proj"])
    keys = set(dict(tree_flatten(m2.trainable_parameters())))
    assert keys == {"model.layers.1.self_attn.q_proj.lora_a", "model.layers.1.self_attn.q_proj.lora_b"}


def _perturb_lora(model):
    params = dict(tree_flatten(model.trainable_parameters()))
    rng = np.random.default_rng(0)
    model.load_weights([(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))) for k, v in params.items()],
                       strict=False)


def test_adapters_saved_by_lazarus_load_in_mlx_lm(tiny_dir, tmp_path):
    from mlx_lm.utils import load as mlx_load

    model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4, lora_alpha=8.0)
    _perturb_lora(model)
    save_adapters(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["scale"] == 2.0
    theirs, _ = mlx_load(str(tiny_dir), adapter_path=str(tmp_path / "ad"))
    np.testing.assert_allclose(logits(model, tok), logits(theirs, tok), atol=1e-5)
    # and mlx_lm's generate command accepts them
    out = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny_dir), "--adapter-path",
                          str(tmp_path / "ad"), "--prompt", "What is 1+1?", "--max-tokens", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_adapters_trained_by_mlx_lm_lora_load_in_lazarus(tiny_dir, tmp_path, examples):
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (examples / "sft_train.jsonl").read_text().splitlines()[:8]]
    text = "".join(json.dumps({"prompt": r["prompt"], "completion": r["response"]}) + "\n" for r in rows)
    (data / "train.jsonl").write_text(text)
    (data / "valid.jsonl").write_text(text)
    out = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--model", str(tiny_dir), "--train", "--data",
                          str(data), "--iters", "2", "--batch-size", "2", "--adapter-path", str(tmp_path / "ad"),
                          "--num-layers", "2", "--val-batches", "1", "--learning-rate", "1e-2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    from mlx_lm.utils import load as mlx_load

    theirs, tok = mlx_load(str(tiny_dir), adapter_path=str(tmp_path / "ad"))
    ours, _ = load_model(tiny_dir, adapter_path=tmp_path / "ad", use_lora=True)
    np.testing.assert_allclose(logits(ours, tok), logits(theirs, tok), atol=1e-5)
    trainable = dict(tree_flatten(ours.trainable_parameters()))
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)


def test_clear_errors_for_missing_models(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(ModelLoadError, match="not a local folder|model folder not found"):
        load_model("some-org/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_model(tmp_path / "empty")


def test_lora_init_is_seeded_and_leaves_the_global_rng_alone(tiny_dir):
    def lora(model):
        return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}

    mx.random.seed(123)
    key = np.array(mx.random.state[0])
    a = lora(load_model(tiny_dir, use_lora=True, lora_rank=4)[0])
    np.testing.assert_array_equal(np.array(mx.random.state[0]), key)  # the caller's stream is untouched
    mx.random.uniform(shape=(5,))  # move the global RNG on: the next load must not care
    b = lora(load_model(tiny_dir, use_lora=True, lora_rank=4)[0])
    other = lora(load_model(tiny_dir, use_lora=True, lora_rank=4, seed=1)[0])
    assert set(a) == set(b) and any(np.abs(v).max() > 0 for k, v in a.items() if k.endswith("lora_a"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(not np.array_equal(a[k], other[k]) for k in a if k.endswith("lora_a"))


def test_lora_settings_are_recorded_outside_the_parameter_tree(tiny_dir, tmp_path):
    from lazarus.models import LoRASettings, lora_settings, mark_lora

    model, _ = load_model(tiny_dir, use_lora=True, lora_rank=4, lora_layers=1)
    settings = lora_settings(model)
    assert settings == LoRASettings(rank=4, num_layers=1, base_model=str(tiny_dir))
    save_adapters(model, tmp_path / "ad")
    loaded, _ = load_model(tiny_dir, adapter_path=tmp_path / "ad")  # the other writer: load_model(adapter_path=)
    assert lora_settings(loaded).rank == 4 and lora_settings(loaded).num_layers == 1
    plain, _ = load_model(tiny_dir)
    assert lora_settings(plain) is None
    before = set(dict(tree_flatten(plain.parameters())))
    mark_lora(plain, settings)
    assert lora_settings(plain) is settings and "_lazarus_lora" not in plain  # not a child/parameter entry
    assert set(dict(tree_flatten(plain.parameters()))) == before


def test_grad_checkpoint_patch_is_scoped_to_flagged_blocks_and_undone(tiny_dir, monkeypatch):
    from lazarus.models import mlx_lm_patches as P

    a, tok = load_model(tiny_dir)
    b, _ = load_model(tiny_dir)
    cls = type(a.layers[0])
    call_before = cls.__call__
    calls = []
    checkpoint = mx.checkpoint
    monkeypatch.setattr(mx, "checkpoint", lambda f: calls.append(1) or checkpoint(f))
    ids = mx.array([list(tok.encode("What is 2+3?", add_special_tokens=False))])
    reference = np.array(a(ids))

    P.enable_grad_checkpoint(a)
    assert all(P.grad_checkpoint_enabled(layer) for layer in a.layers)
    assert not any(P.grad_checkpoint_enabled(layer) for layer in b.layers)
    np.testing.assert_allclose(np.array(a(ids)), reference, atol=1e-6)
    assert len(calls) == len(a.layers)  # a's blocks are checkpointed ...
    b(ids)
    assert len(calls) == len(a.layers)  # ... b's are not
    assert P.GRAD_CHECKPOINT_FLAG not in a and set(dict(tree_flatten(a.parameters()))) == \
        set(dict(tree_flatten(b.parameters())))  # the flag is no parameter
    P.disable_grad_checkpoint(a)
    assert not any(P.grad_checkpoint_enabled(layer) for layer in a.layers)
    assert cls.__call__ is call_before  # the class has its own __call__ back
    a(ids)
    assert len(calls) == len(a.layers)

    with P.grad_checkpointing(b):
        assert all(P.grad_checkpoint_enabled(layer) for layer in b.layers)
        b(ids)
    assert len(calls) == 2 * len(b.layers)
    assert not any(P.grad_checkpoint_enabled(layer) for layer in b.layers) and cls.__call__ is call_before
    with P.grad_checkpointing(b, enabled=False):
        assert not P.grad_checkpoint_enabled(b.layers[0])
