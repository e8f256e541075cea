"""SFT packing: rows of several examples with a block-diagonal mask train exactly like the examples
unpacked; the row plan is deterministic, resumable, and splits across ranks and streams by rows."""

import random
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map_with_path

from conftest import stop_at, write_jsonl
from lazarus.data import DataError, DataLoader, SFTDataset
from lazarus.data.packing import TARGET_PADDING, PackedDataLoader, pack, plan_rows
from lazarus.models import fast_cpu, load_model
from lazarus.models.mlx_lm_patches import PackingUnsupported, check_packing_supported, segment_mask
from lazarus.step import array_part
from lazarus.training import SFTConfig, SFTTrainer

WORDS = "alpha beta gamma delta river stone cloud light north south green blue over under".split()


def spread_rows(n=24, seed=0, lo=1, hi=30):
    rng = random.Random(seed)
    return [{"prompt": f"Say {k} words about {rng.choice(WORDS)}.",
             "response": " ".join(rng.choice(WORDS) for _ in range(k))}
            for k in (rng.randint(lo, hi) for _ in range(n))]


@pytest.fixture
def spread(tmp_path):
    return write_jsonl(tmp_path / "spread.jsonl", spread_rows())


# ---------------------------------------------------------------- the row plan
def test_pack_is_deterministic_fits_and_never_splits():
    sizes = np.random.default_rng(0).integers(1, 200, 500)
    rows = pack(sizes, 400, seed=3)
    assert rows == pack(sizes, 400, seed=3)
    assert sorted(i for r in rows for i in r) == list(range(len(sizes)))  # every example once, whole
    assert all(sizes[r].sum() <= 400 for r in rows)
    assert len(rows) <= int(np.ceil(sizes.sum() / 400)) + 2  # near the lower bound
    with pytest.raises(ValueError, match="item sizes"):
        pack([5, 401], 400)
    length, planned = plan_rows(sizes, seed=3)
    assert 1 - sizes.sum() / (len(planned) * length) < TARGET_PADDING
    assert sizes.max() <= length < 4 * sizes.max()  # short rows: attention costs their length squared
    assert plan_rows(sizes, limit=250)[0] <= 250


def test_padding_under_two_percent_on_the_shipped_data(tiny, examples):
    _, tok = tiny
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        ds = SFTDataset(examples / name, tok)
        packed, bucketed = PackedDataLoader(ds, 4), DataLoader(ds, 4)
        assert packed.padding_fraction(0) < 0.02 < bucketed.padding_fraction(0), name
        assert sorted(i for r in packed.rows for i in r) == list(range(len(ds)))


def test_epoch_order_is_a_function_of_seed_and_epoch_and_ranks_and_streams_split_rows(tiny, spread):
    _, tok = tiny
    ds = SFTDataset(spread, tok)
    a, b = PackedDataLoader(ds, 4, seed=1), PackedDataLoader(ds, 4, seed=1)
    assert a.rows == b.rows and len(a) == len(b)
    assert [x.tolist() for x in a.epoch_batches(1)] == [x.tolist() for x in b.epoch_batches(1)]
    assert [x.tolist() for x in a.epoch_batches(0)] != [x.tolist() for x in a.epoch_batches(1)]
    assert len(a.epoch_batches(1)) == len(a)  # the same number of batches every epoch
    whole = a.get_batch(0, 0)
    assert whole["inputs"].shape[1] == a.row_length
    shards = a.get_batch_shards(0, 0, 2)
    assert [s["inputs"].shape[1] for s in shards] == [a.row_length] * 2
    assert sum(s["num_tokens"] for s in shards) == whole["num_tokens"] == int(whole["loss_weight"].item())
    ranks = [PackedDataLoader(ds, 4, seed=1) for _ in range(2)]
    for r, loader in enumerate(ranks):
        loader.set_distributed(r, 2)
    parts = [loader.get_batch(0, 0) for loader in ranks]
    np.testing.assert_array_equal(np.concatenate([np.array(p["inputs"]) for p in parts]), np.array(whole["inputs"]))


def test_an_example_longer_than_the_row_is_truncated_and_a_prompt_that_fills_it_refused(tiny, tmp_path):
    _, tok = tiny
    rows = spread_rows(8, hi=6) + [{"prompt": "Hi.", "response": " ".join(WORDS * 4)}]
    ds = SFTDataset(write_jsonl(tmp_path / "long.jsonl", rows), tok)
    limit = int(ds.lengths()[:8].max()) + 2  # every short example fits, the long one does not
    with pytest.warns(UserWarning, match="1 examples longer than the packed row"):
        loader = PackedDataLoader(ds, 2, limit=limit)
    assert loader.row_length == limit and loader.get_batch(0, 0)["inputs"].shape[1] == limit
    long = loader.collate_fn([next(r for r, row in enumerate(loader.rows) if 8 in row)])
    assert long["num_tokens"] == limit - ds.examples[8].prompt_len + 1  # cut to the row, still trained
    rows[-1] = {"prompt": " ".join(WORDS * 4), "response": "ok"}
    ds = SFTDataset(write_jsonl(tmp_path / "long_prompt.jsonl", rows), tok)
    with warnings.catch_warnings(), pytest.raises(DataError, match=r"long_prompt.jsonl:9: prompt alone"):
        warnings.simplefilter("ignore")
        PackedDataLoader(ds, 2, limit=limit)


# ---------------------------------------------------------------- the same loss and gradients
def _loss_and_grads(trainer, model, batch):
    (loss, _), grads = nn.value_and_grad(model, trainer.compute_loss)(model, array_part(batch))
    return loss, dict(tree_flatten(grads))


@pytest.mark.parametrize("arch,lora,fast", [("llama", False, True), ("llama", True, True), ("llama", False, False),
                                            ("qwen2", True, True), ("gemma3", False, True)])
def test_packed_batch_gives_the_unpacked_loss_and_gradients(tiny_dir, model_zoo, spread, arch, lora, fast):
    folder = tiny_dir if arch == "llama" else model_zoo(arch, dtype="float32")
    model, tok = load_model(folder, use_lora=lora, lora_rank=4)
    if lora:  # lora_b starts at zero: give it values so that every adapter gradient is exercised
        model.update(tree_map_with_path(lambda k, p: 0.02 * mx.random.normal(p.shape, key=mx.random.key(1))
                                        if k.endswith("lora_b") else p, model.trainable_parameters()))
    ds = SFTDataset(spread, tok)  # prompt tokens masked (completion-only loss)
    trainer = SFTTrainer(model, tok, SFTConfig())
    loader = PackedDataLoader(ds, 4)
    assert loader.padding_fraction(0) < 0.05 and max(len(r) for r in loader.rows) >= 2
    with fast_cpu.fast_cpu_kernels(model, fast):
        check_packing_supported(model)
        packed = loader.get_batch(0, 0)
        unpacked = ds.collate(packed["indices"])
        assert packed["num_tokens"] == unpacked["num_tokens"]
        lp, gp = _loss_and_grads(trainer, model, packed)
        lu, gu = _loss_and_grads(trainer, model, unpacked)
    assert abs(lp.item() - lu.item()) <= 1e-5
    scale = max(1.0, max(mx.abs(g).max().item() for g in gu.values()))  # float32 noise grows with the values
    for k in gu:
        assert mx.abs(gp[k] - gu[k]).max().item() <= 1e-5 * scale, k


def test_segment_mask_with_the_fast_attention_matches_mlx_and_keeps_rows_finite():
    segments = mx.array([[1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 1, 1, 1, 1, 2, 2]])
    mask = segment_mask(segments)
    assert mask.shape == (2, 1, 8, 8) and mask[0, 0, 3, 2].item() is False and mask[0, 0, 4, 3].item() is True
    q, k, v = (mx.random.normal((2, 4, 8, 16), key=mx.random.key(i)) for i in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped-query attention
    ours = fast_cpu.scaled_dot_product_attention(q, k, v, None, scale=0.25, mask=mask)
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-5)
    additive = fast_cpu.scaled_dot_product_attention(q, k, v, None, scale=0.25, mask=mx.where(mask, 0.0, -mx.inf))
    np.testing.assert_allclose(np.array(additive), np.array(theirs), atol=1e-5)
    windowed = segment_mask(segments, window_size=2)
    assert windowed[1, 0, 5, 3].item() is False and windowed[1, 0, 5, 4].item() is True
    empty = mx.zeros((2, 1, 8, 8), dtype=mx.bool_)  # a fully masked row gives zeros, not NaN
    assert mx.all(fast_cpu.scaled_dot_product_attention(q, k, v, None, scale=0.25, mask=empty) == 0).item()


def test_absolute_position_embeddings_are_refused():
    from mlx_lm.models import gpt2

    args = gpt2.ModelArgs(model_type="gpt2", n_ctx=64, n_embd=32, n_head=4, n_layer=1, n_positions=64,
                          layer_norm_epsilon=1e-5, vocab_size=64)
    with pytest.raises(PackingUnsupported, match="absolute positions"):
        check_packing_supported(gpt2.Model(args))
    with pytest.raises(PackingUnsupported, match="builds no attention mask"):  # not an mlx-lm model
        check_packing_supported(nn.Sequential(nn.Embedding(64, 8), nn.Linear(8, 64)))


# ---------------------------------------------------------------- training
def _train(tiny_dir, data, out, streams=1, accumulation=1, max_steps=6, resume=None, stop=None, dropout=0.0):
    mx.random.seed(0)
    model, tok = load_model(tiny_dir, use_lora=True, lora_rank=4, lora_dropout=dropout)
    cfg = SFTConfig(packing=True, max_steps=max_steps, batch_size=2, learning_rate=1e-3, warmup_steps=2,
                    log_interval=1, grad_accumulation_steps=accumulation, cpu_streams=streams,
                    checkpoint_interval=stop or 1000, checkpoint_dir=str(out), lr_schedule="cosine")
    trainer = SFTTrainer(model, tok, cfg, callbacks=[stop_at(stop)] if stop else [])
    result = trainer.train(data, resume_from=resume)
    weights = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    return [h["loss"] for h in result.history if "loss" in h], weights, result, trainer


def test_packing_trains_with_accumulation_and_two_streams(tiny_dir, examples, tmp_path):
    one, w1, result, trainer = _train(tiny_dir, examples / "sft_train.jsonl", tmp_path / "a", accumulation=2)
    two, w2, _, _ = _train(tiny_dir, examples / "sft_train.jsonl", tmp_path / "b", streams=2, accumulation=2)
    assert trainer.loop.train_data.row_length > 2 * max(SFTDataset(examples / "sft_train.jsonl",
                                                                   trainer.tokenizer).lengths())
    assert len(one) == len(two) == 6 and np.isfinite(one).all() and one[-1] < one[0]
    np.testing.assert_allclose(two, one, rtol=1e-4)  # row shards, token-weighted = the whole batch
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert all(h["padding_fraction"] < 0.02 for h in result.history if "padding_fraction" in h)
    assert "rows of" in result.state.run_info["packing"]


def test_packed_resume_is_exact(tiny_dir, examples, tmp_path):
    data = examples / "sft_train.jsonl"
    run = dict(max_steps=9, dropout=0.1, streams=2)  # into a second epoch; dropout draws random numbers
    straight, w1, _, _ = _train(tiny_dir, data, tmp_path / "a", **run)
    _train(tiny_dir, data, tmp_path / "b", stop=4, **run)
    resumed, w2, _, _ = _train(tiny_dir, data, tmp_path / "b", resume=tmp_path / "b" / "step_4.safetensors", **run)
    assert resumed == straight
    for k in w1:
        np.testing.assert_array_equal(w2[k], w1[k], err_msg=k)


def test_the_packed_attention_patch_is_undone_and_works_under_grad_checkpointing(tiny_dir, spread):
    import mlx_lm.models.llama as llama

    from lazarus.models import mlx_lm_patches as P

    model, tok = load_model(tiny_dir)
    batch = PackedDataLoader(SFTDataset(spread, tok), 2).get_batch(0, 0)
    mask_fn, rope_call = llama.create_attention_mask, nn.RoPE.__call__
    trainer = SFTTrainer(model, tok, SFTConfig())
    plain = _loss_and_grads(trainer, model, batch)
    with P.grad_checkpointing(model):
        checkpointed = _loss_and_grads(trainer, model, batch)
    assert abs(plain[0].item() - checkpointed[0].item()) <= 1e-6
    with pytest.raises(RuntimeError, match="inside"):
        with P.packed_attention(model, batch["segment_ids"]):
            assert llama.create_attention_mask is not mask_fn and nn.RoPE.__call__ is not rope_call
            raise RuntimeError("inside")
    assert llama.create_attention_mask is mask_fn and nn.RoPE.__call__ is rope_call


def test_packed_multi_turn_rows_train_every_assistant_turn_only(tiny, tmp_path):
    """A packed conversation trains exactly the targets the unpacked one does (every assistant turn,
    not the user turns between them)."""
    from lazarus.data import SFTDataset
    from lazarus.data.packing import collate_packed

    model, tok = tiny
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 3+4?"}, {"role": "assistant", "content": "7"}]
    rows = [{"messages": msgs}, {"messages": [{"role": "user", "content": "What is 1+1?"},
                                              {"role": "assistant", "content": "2"}]}]
    ds = SFTDataset(rows, tok)
    plain = ds.collate([0, 1])
    packed = collate_packed(ds, [[0, 1]], sum(len(e.ids) - 1 for e in ds.examples))
    want = [np.array(plain["targets"][r])[np.array(plain["mask"][r]) > 0].tolist() for r in range(2)]
    got = np.array(packed["targets"][0])[np.array(packed["mask"][0]) > 0].tolist()
    assert got == want[0] + want[1] and len(want[0]) > 2  # both assistant turns of the conversation
