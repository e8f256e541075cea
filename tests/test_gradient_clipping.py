"""Global-norm clipping: the norm over small (concatenated) and large (reduced alone) tensors."""

import mlx.core as mx
import numpy as np

from lazarus.callbacks import GradientClipping
from lazarus.tree_reductions import SMALL_TENSOR, global_norm


def test_global_norm_mixes_small_and_large_tensors_exactly():
    keys = mx.random.split(mx.random.key(0), 4)
    grads = {"lora": [mx.random.normal((8, 64), key=keys[0]), mx.random.normal((64, 8), key=keys[1])],
             "big": mx.random.normal((SMALL_TENSOR + 7,), key=keys[2]),
             "huge": mx.random.normal((512, 300), key=keys[3]).astype(mx.bfloat16)}
    leaves = [np.array(g.astype(mx.float32), dtype=np.float64) for g in
              (grads["lora"][0], grads["lora"][1], grads["big"], grads["huge"])]
    expected = np.sqrt(sum((x ** 2).sum() for x in leaves))
    assert abs(float(global_norm(grads)) - expected) <= 1e-4 * expected  # float32 sums of ~2e5 squares
    assert float(global_norm({})) == 0.0
    clipped, metrics = GradientClipping(1.0).transform_grads(grads)
    assert abs(float(global_norm(clipped)) - 1.0) < 1e-2 and abs(float(metrics["grad_norm"]) - expected) < 1e-3 * expected


def test_norm_spread_over_cpu_streams_is_bit_identical_and_scoped():
    """Inside reduction_streams the large tensors' reductions alternate over the streams (the
    Loop's step traces inside it); the parts are added in the same order, so the norm is the
    same float32 number, compiled or not, and the scope ends with its block."""
    from lazarus import tree_reductions

    keys = mx.random.split(mx.random.key(1), 5)
    grads = {f"w{i}": mx.random.normal((300 + i, 700), key=keys[i]) for i in range(4)}
    grads["lora"] = mx.random.normal((8, 64), key=keys[4])
    with mx.stream(mx.cpu):  # the streams below are CPU streams: compare like with like
        one = np.array(global_norm(grads))
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    with tree_reductions.reduction_streams(streams):
        assert tree_reductions._STREAMS.get() == tuple(streams)
        spread = np.array(global_norm(grads))
        compiled = np.array(mx.compile(global_norm)(grads))
    assert tree_reductions._STREAMS.get() == ()
    with tree_reductions.reduction_streams(streams[:1]):  # one stream: nothing to spread over
        assert tree_reductions._STREAMS.get() == ()
    assert one.tobytes() == spread.tobytes() == compiled.tobytes()


def test_the_loop_traces_its_norm_and_finite_check_over_its_cpu_streams(tiny_dir, examples, tmp_path, monkeypatch):
    """With cpu_streams: 2 the compiled step is traced inside reduction_streams(loop.streams), so
    clipping's norm and the finite check spread their reductions; with 1 stream they do not."""
    from lazarus import step, tree_reductions
    from lazarus.models import load_model
    from lazarus.training import SFTConfig, SFTTrainer

    seen = []
    original = tree_reductions.summed_over_leaves

    def spy(tree, per_element):
        seen.append(tree_reductions._STREAMS.get())
        return original(tree, per_element)

    monkeypatch.setattr(tree_reductions, "summed_over_leaves", spy)  # global_norm (clipping) looks it up here
    monkeypatch.setattr(step, "summed_over_leaves", spy)  # the finite check
    for streams in (2, 1):
        seen.clear()
        model, tok = load_model(tiny_dir)
        cfg = SFTConfig(max_steps=2, batch_size=4, warmup_steps=0, max_grad_norm=1.0, cpu_streams=streams,
                        checkpoint_interval=None, checkpoint_dir=str(tmp_path / f"s{streams}"))
        trainer = SFTTrainer(model, tok, cfg)
        trainer.train(examples / "sft_train.jsonl")
        assert len(seen) >= 2  # the norm and the finite check, traced once each
        assert set(seen) == ({tuple(trainer.loop.streams)} if streams == 2 else {()}), streams
