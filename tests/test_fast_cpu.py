"""The vectorised-exp kernels for MLX's CPU backend: values, gradients, patching, training."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lazarus.models import fast_cpu as F


def close(a, b, tol):
    """max |a - b| <= tol * (1 + max |b|)"""
    return float(mx.abs(a - b).max()) <= tol * (1.0 + float(mx.abs(b).max()))


def test_fast_exp_matches_exp_over_the_float32_range_and_at_the_edges():
    x = mx.linspace(-64.0, 88.0, 400001)
    rel = mx.abs(F.fast_exp(x) - mx.exp(x)) / mx.exp(x)
    assert float(rel.max()) < 1e-5
    edge = F.fast_exp(mx.array([-mx.inf, -1000.0, -87.0, -64.01, 0.0, 1.0, 1000.0, mx.inf])).tolist()
    assert edge[:4] == [0.0, 0.0, 0.0, 0.0]  # flushed to exactly 0, never a subnormal
    assert edge[4] == 1.0 and abs(edge[5] - math.e) < 1e-6
    assert math.isinf(edge[6]) and math.isinf(edge[7])
    base = mx.random.normal((32, 48), key=mx.random.key(0)) * 10
    for view in (base.T, base[::2, 1::3], mx.broadcast_to(base[:1], (32, 48))):  # strided inputs
        assert float((mx.abs(F.fast_exp(view) - mx.exp(view)) / mx.exp(view)).max()) < 1e-5
    assert F.fast_exp(mx.zeros((3,), dtype=mx.bfloat16)).dtype == mx.bfloat16


def subnormal_share(a) -> float:
    a = np.abs(np.array(a.astype(mx.float32)))
    return float(((a > 0) & (a < np.finfo(np.float32).tiny)).mean())


def test_no_subnormal_floats_from_masked_attention_or_saturated_sigmoid():
    # Subnormals make Intel FMA units take microcode assists (sgemm over half-subnormal attention
    # probabilities ran whole training steps ~5x slower); the kernels must never produce them.
    B, H, L, D = 2, 4, 64, 16
    q, k, v = (mx.random.normal((B, H, L, D), key=mx.random.key(i)) for i in range(3))
    causal = mx.where(mx.arange(L)[:, None] >= mx.arange(L)[None], 0.0, -mx.inf)
    _, probs = F._attention_core(q * D ** -0.5, k, v, causal)
    assert float((probs == 0).mean()) > 0.4 and subnormal_share(probs) == 0.0
    additive = mx.where(causal == 0, 0.0, float(np.finfo(np.float32).min))  # mlx-lm's array masks
    assert subnormal_share(F._attention_core(q, k, v, additive)[1]) == 0.0
    grads = mx.grad(lambda a, b, c: F.attention(a, b, c, D ** -0.5, "causal").sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(subnormal_share(g) == 0.0 for g in grads)
    gate = mx.linspace(-200.0, 200.0, 4001)
    assert subnormal_share(F._sigmoid(gate)) == 0.0 and subnormal_share(F.swiglu(gate, mx.ones_like(gate))) == 0.0
    assert subnormal_share(mx.grad(lambda g: F.swiglu(g, mx.ones_like(g)).sum())(gate)) == 0.0
    assert subnormal_share(F.softmax(gate * 10)) == 0.0


def test_softmax_and_logsumexp_values_and_gradients():
    k = mx.random.split(mx.random.key(1), 2)
    finite = mx.random.normal((3, 5, 17), key=k[0]) * 4
    x = mx.where(mx.arange(17) > 12, -mx.inf, finite)  # masked entries, as in causal attention
    w = mx.random.normal((3, 5, 17), key=k[1])
    assert close(F.softmax(x), mx.softmax(x, axis=-1), 1e-6)
    assert close(F.softmax(finite, axis=1), mx.softmax(finite, axis=1), 1e-6)
    assert close(F.logsumexp(x), mx.logsumexp(x, axis=-1), 1e-5)
    assert close(F.logsumexp(finite, axis=0, keepdims=True), mx.logsumexp(finite, axis=0, keepdims=True), 1e-5)
    g_ref = mx.grad(lambda a: (mx.softmax(a, axis=-1) * w).sum())(x)
    assert close(mx.grad(lambda a: (F.softmax(a) * w).sum())(x), g_ref, 1e-6)
    g_ref = mx.grad(lambda a: (mx.logsumexp(a, axis=-1) * w[..., 0]).sum())(x)
    assert close(mx.grad(lambda a: (F.logsumexp(a) * w[..., 0]).sum())(x), g_ref, 1e-6)


def test_swiglu_matches_mlx_lm_with_gradients():
    from mlx_lm.models.activations import swiglu as reference

    g, x, w = (mx.random.normal((4, 9, 32), key=mx.random.key(i)) * 3 for i in range(3))
    assert close(F.swiglu(g, x), reference(g, x), 1e-5)
    ours = mx.grad(lambda a, b: (F.swiglu(a, b) * w).sum(), argnums=(0, 1))(g, x)
    ref = mx.grad(lambda a, b: (reference(a, b) * w).sum(), argnums=(0, 1))(g, x)
    assert all(close(a, b, 1e-5) for a, b in zip(ours, ref))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("mask_kind", ["causal", "causal_offset", "bool", "additive", None])
def test_attention_matches_mx_fast_sdpa(heads, kv_heads, mask_kind):
    keys = mx.random.split(mx.random.key(2), 4)
    L, S = (3, 7) if mask_kind == "causal_offset" else (6, 6)  # L < S: queries after a KV cache
    q = mx.random.normal((2, heads, L, 16), key=keys[0])
    k = mx.random.normal((2, kv_heads, S, 16), key=keys[1])
    v = mx.random.normal((2, kv_heads, S, 16), key=keys[2])
    mask = {"causal": "causal", "causal_offset": "causal", None: None,
            "bool": (mx.random.uniform(shape=(2, 1, L, S), key=keys[3]) > 0.4) | (mx.arange(S) == 0),
            "additive": mx.random.normal((L, S), key=keys[3])}[mask_kind]
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert close(F.attention(q, k, v, 0.25, mask), ref, 1e-5)
    wo = mx.random.normal(ref.shape, key=keys[0])
    g_ref = mx.grad(lambda *a: (mx.fast.scaled_dot_product_attention(*a, scale=0.25, mask=mask) * wo).sum(),
                    argnums=(0, 1, 2))(q, k, v)
    g = mx.grad(lambda *a: (F.attention(*a, 0.25, mask) * wo).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(close(a, b, 1e-5) for a, b in zip(g, g_ref))


def test_attention_in_bfloat16_keeps_dtype_and_matches():
    keys = mx.random.split(mx.random.key(3), 3)
    q, k, v = (mx.random.normal((1, 4, 8, 16), key=key).astype(mx.bfloat16) for key in keys)
    out = F.attention(q, k, v, 0.25, "causal")
    assert out.dtype == mx.bfloat16
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    assert close(out.astype(mx.float32), ref.astype(mx.float32), 2e-2)
    grads = mx.grad(lambda *a: F.attention(*a, 0.25, "causal").astype(mx.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(g.dtype == mx.bfloat16 for g in grads)


def test_context_patches_only_inside_and_only_when_enabled(tiny):
    import mlx_lm.models.llama as llama
    from mlx_lm.models.base import scaled_dot_product_attention as original_sdpa

    model, _ = tiny
    original_swiglu = llama.swiglu
    with F.fast_cpu_kernels(model, enabled=False) as on:
        assert on is False and llama.swiglu is original_swiglu
    with F.fast_cpu_kernels(model) as on:
        assert on is True
        assert llama.swiglu is F.swiglu and llama.scaled_dot_product_attention is F.scaled_dot_product_attention
        assert F.log_normalizer(mx.zeros((1, 4))).item() == pytest.approx(math.log(4), abs=1e-6)
    assert llama.swiglu is original_swiglu and llama.scaled_dot_product_attention is original_sdpa
    assert F.step_kernels() is F.NATIVE


def test_patches_are_undone_after_an_error_and_nested_blocks_unwind(tiny):
    import mlx_lm.models.llama as llama

    model, _ = tiny
    original_swiglu = llama.swiglu
    with pytest.raises(RuntimeError, match="boom"):
        with F.fast_cpu_kernels(model, F.FAST) as on:
            assert on is True and F.step_kernels() is F.FAST
            with F.fast_cpu_kernels(model, enabled=False) as inner:  # leaves the enclosing choice alone
                assert inner is False and llama.swiglu is F.swiglu and F.step_kernels() is F.FAST
            with F.fast_cpu_kernels(model):
                assert llama.swiglu is F.swiglu
            assert llama.swiglu is F.swiglu and F.step_kernels() is F.FAST
            raise RuntimeError("boom")
    assert llama.swiglu is original_swiglu and F.step_kernels() is F.NATIVE


def test_kernel_choice_is_an_explicit_value():
    x = mx.random.normal((3, 17), key=mx.random.key(5)) * 4
    ref = mx.logsumexp(x, axis=-1, keepdims=True)
    assert F.resolve(F.FAST) is True and F.resolve(F.NATIVE) is False and F.resolve(False) is False
    assert F.step_kernels() is F.NATIVE  # outside every block
    fast = F.log_normalizer(x, keepdims=True, kernels=F.FAST)  # a caller's own choice wins over the scope
    assert fast.shape == (3, 1) and close(fast, ref, 1e-5)
    assert F.CpuKernels(fast=True) == F.FAST and F.log_normalizer(x).shape == (3,)
    np.testing.assert_array_equal(np.array(F.NATIVE.log_normalizer(x, keepdims=True)), np.array(ref))


def _batch_grads(model, batches):
    from lazarus.training.base import token_logps

    def loss(m, b):
        return -(token_logps(m, b["inputs"], b["targets"]) * b["mask"]).sum()

    value_and_grad = nn.value_and_grad(model, loss)
    step = mx.compile(lambda b: value_and_grad(model, b), inputs=[model.state], outputs=[model.state])
    return [dict(tree_flatten(step(b)[1])) for b in batches]


def test_gradients_do_not_depend_on_how_the_batch_is_split(tiny_dir, examples):
    """One batch of 8 must give the sum of the gradients of its two halves (what two ranks do)."""
    from lazarus.data import SFTDataset
    from lazarus.models import load_model

    model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4)
    ds = SFTDataset(examples / "sft_train.jsonl", tok)
    whole, a, b = (ds.collate(list(idx), pad_multiple=8) for idx in (range(8), range(4), range(4, 8)))
    with F.fast_cpu_kernels(model) as on:
        assert on
        g8, ga, gb = _batch_grads(model, [whole, a, b])
    native = _batch_grads(model, [whole])[0]
    for name, g in g8.items():
        scale = float(mx.abs(g).max()) + 1e-9
        assert float(mx.abs(g - ga[name] - gb[name]).max()) / scale < 1e-4, name
        assert float(mx.abs(g - native[name]).max()) / scale < 1e-4, name


def test_sft_training_is_the_same_with_and_without_fast_kernels(tiny_dir, examples, tmp_path):
    from lazarus.models import load_model
    from lazarus.training import SFTConfig, SFTTrainer

    losses = {}
    for fast in (True, False):
        mx.random.seed(0)
        model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4)
        cfg = SFTConfig(max_steps=8, batch_size=4, learning_rate=1e-3, warmup_steps=0, log_interval=1,
                        checkpoint_interval=None, checkpoint_dir=str(tmp_path / str(fast)), fast_cpu_kernels=fast)
        result = SFTTrainer(model, tok, cfg).train(examples / "sft_train.jsonl")
        losses[fast] = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses[True]) == 8
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-4)
    assert losses[True][-1] < losses[True][0]
