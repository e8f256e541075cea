"""Every monkey-patch Lazarus applies to mlx-lm, in one place.

Lazarus trains mlx-lm's own model classes and changes their behaviour in exactly three ways, all
here. Nothing else in Lazarus rebinds a name inside an mlx-lm module or replaces a method of an
mlx-lm class (or of ``mlx.nn.RoPE``, which patch 3 wraps while a packed forward pass runs).

1. **Fast CPU kernels** (:func:`fast_kernels_installed`).
   *What*: the module-level names ``swiglu`` and ``scaled_dot_product_attention`` inside the
   ``mlx_lm.models.<architecture>`` modules are rebound to :func:`lazarus.models.fast_cpu.swiglu`
   and :func:`lazarus.models.fast_cpu.scaled_dot_product_attention`.
   *Why*: on MLX's CPU backend ``exp`` runs one element at a time, so SwiGLU and the attention
   softmax cost more than the matmuls of a small model (see :mod:`lazarus.models.fast_cpu`).
   Each architecture module imports both functions by name (``from .activations import swiglu``,
   ``from .base import scaled_dot_product_attention``) and its layers look them up in the
   module's globals at call time, so rebinding that global is the one place to switch them;
   patching ``mlx_lm.models.activations`` itself would change nothing.
   *Which models*: only the modules that define a class of one of ``model``'s submodules
   (``type(m).__module__``), and only the names such a module actually has. While the block is
   open, every model of those architectures in the process uses the replacements (the binding
   is per module, not per model instance).
   *Undone*: on leaving the ``with`` block (also on an exception) every rebound name gets back
   the value it had on entry, in reverse order, so nested blocks unwind correctly.
   Callers enter it through :func:`lazarus.models.fast_cpu.fast_cpu_kernels`, which also decides
   whether the kernels are used at all (CPU backend, config setting, per-machine measurement).

2. **Gradient checkpointing** (:func:`enable_grad_checkpoint`, :func:`disable_grad_checkpoint`,
   :func:`grad_checkpointing`).
   *What*: the ``__call__`` of the class of ``model.layers[0]`` (the transformer block class,
   e.g. ``mlx_lm.models.llama.TransformerBlock``) is replaced by a wrapper.
   *Why*: Python looks ``__call__`` up on the class, not the instance, so a per-instance
   override is impossible; the wrapper runs the block under ``mx.checkpoint`` (activations are
   recomputed in the backward pass instead of stored: less memory, one more forward per block).
   *Which models*: the wrapper checkpoints only block instances whose
   :data:`GRAD_CHECKPOINT_FLAG` attribute is true, and that attribute is set by
   :func:`enable_grad_checkpoint` only (on every block of the model it is given). Every other
   instance of the class, in this model or any other, runs the original ``__call__`` unchanged.
   *Undone*: :func:`disable_grad_checkpoint` clears the flags of a model's blocks, and once no
   block of the class is flagged any more it puts the class's original ``__call__`` back.
   :func:`grad_checkpointing` is the scoped form (enable on entry, disable on exit).

3. **Packed attention** (:func:`packed_attention`, for SFT packing, :mod:`lazarus.data.packing`).
   *What*: (a) the module-level name ``create_attention_mask`` inside the
   ``mlx_lm.models.<architecture>`` modules behind ``model``'s layers is rebound to a function
   that returns the block-diagonal causal mask of a packed batch (:func:`segment_mask`: boolean,
   ``(B, 1, T, T)``, a token sees the earlier tokens of its own example; a sliding window, when
   the caller asks for one, is kept); (b) the ``__call__`` of the rotary embedding classes the
   model uses (``mlx.nn.RoPE`` and mlx-lm's ``SuScaledRoPE``, ``Llama3RoPE``, ``YarnRoPE``,
   ``ProportionalRoPE``) is replaced by a wrapper that, for an input spanning the packed rows,
   rotates every token by its position within its own example (:func:`segment_positions`;
   ``mx.fast.rope`` with one offset per token), so positions restart at 0 for every example.
   *Why*: each model's inner module builds its mask with that function (imported by name from
   ``mlx_lm.models.base``) and hands it to every attention layer, and its attention calls
   ``self.rope(x)`` with offset 0 when there is no cache; models take neither a mask nor
   positions. Entered inside ``compute_loss``, so it is active while ``mx.compile`` traces the
   forward pass: mask and positions are traced functions of the batch's ``segment_ids``, and a
   new batch of the same shape does not retrace. Restarting positions changes no mathematics
   (rotary attention depends on the distance between two tokens only) but keeps the rotation
   angles, rounded in float32, exactly those of the example alone (at position 3000 they
   moved a gemma3's logits by ~6e-4 otherwise).
   *Which models*: the architecture modules of patch 1 and the rotary classes used by ``model``,
   for the duration of one forward pass; other rotary classes (or calls with an offset) are left
   alone, which is still exact up to float rounding. An architecture whose forward pass never
   asks for a mask, or in which an example still sees another example or depends on where in
   the row it starts (absolute position embeddings, recurrent layers), is refused by
   :func:`check_packing_supported`.
   *Undone*: on leaving the ``with`` block every rebound name and ``__call__`` gets its value from
   entry back.
"""

from __future__ import annotations

import contextlib
import sys

import mlx.core as mx

from lazarus.models import fast_cpu

# --------------------------------------------------------------------------- 1. fast CPU kernels


def _fast_kernel_replacements() -> dict:
    """mlx-lm global name -> the Lazarus function that replaces it inside a fast-kernel block."""
    return {"swiglu": fast_cpu.swiglu, "scaled_dot_product_attention": fast_cpu.scaled_dot_product_attention}


def _architecture_modules(model) -> list:
    """The ``mlx_lm.models.*`` modules that define a class of one of ``model``'s submodules."""
    names = sorted({type(m).__module__ for m in model.modules()})
    return [sys.modules[n] for n in names if n.startswith("mlx_lm.models.") and n in sys.modules]


@contextlib.contextmanager
def fast_kernels_installed(model):
    """Patch 1 (see the module docstring): within the block, the mlx-lm modules behind ``model``'s
    layers call Lazarus's SwiGLU and attention; every binding is restored on exit."""
    saved = []
    for mod in _architecture_modules(model):
        for attr, fn in _fast_kernel_replacements().items():
            if attr in vars(mod):
                saved.append((mod, attr, vars(mod)[attr]))
                setattr(mod, attr, fn)
    try:
        yield
    finally:
        for mod, attr, fn in reversed(saved):
            setattr(mod, attr, fn)


# --------------------------------------------------------------------------- 2. gradient checkpointing

#: Instance attribute of a transformer block: when true, the wrapped ``__call__`` recomputes the
#: block in the backward pass. Set and cleared only by the functions below. Stored with
#: ``object.__setattr__`` (outside the module's parameter dict, like any non-container value).
GRAD_CHECKPOINT_FLAG = "_lazarus_grad_checkpoint"
#: Class attribute: true once the class's ``__call__`` is the checkpointing wrapper. (These two
#: names are also the ones the earlier copy of this patch in ``lazarus.training.base`` uses, so
#: the two never wrap a class twice while both exist.)
_WRAPPED_MARK = "_lazarus_checkpoint_wrapper"
_original_calls: dict[type, object] = {}  # block class -> its own __call__, for the undo
_flagged_blocks: dict[type, int] = {}  # block class -> how many of its instances are flagged here


def _blocks(model) -> list:
    layers = getattr(model, "layers", None)
    if not layers:
        raise ValueError("grad_checkpoint needs a model with .layers (transformer blocks)")
    return list(layers)


def _wrap_block_class(cls) -> None:
    if getattr(cls, _WRAPPED_MARK, False):
        return
    original = cls.__call__

    def call(self, *args, **kwargs):
        if not getattr(self, GRAD_CHECKPOINT_FLAG, False):
            return original(self, *args, **kwargs)

        def inner(params, *a, **k):
            self.update(params)
            return original(self, *a, **k)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    _original_calls[cls] = original
    cls.__call__ = call
    setattr(cls, _WRAPPED_MARK, True)


def _unwrap_block_class(cls) -> None:
    if cls in _original_calls:
        cls.__call__ = _original_calls.pop(cls)
        delattr(cls, _WRAPPED_MARK)


def enable_grad_checkpoint(model) -> None:
    """Recompute each transformer block of ``model`` in the backward pass instead of storing its
    activations (patch 2 of the module docstring): wraps the block class once, flags this model's
    blocks. Other models, and unflagged blocks, are untouched."""
    blocks = _blocks(model)
    cls = type(blocks[0])
    _wrap_block_class(cls)
    newly = [b for b in blocks if not grad_checkpoint_enabled(b)]
    for block in newly:
        object.__setattr__(block, GRAD_CHECKPOINT_FLAG, True)
    _flagged_blocks[cls] = _flagged_blocks.get(cls, 0) + len(newly)


def disable_grad_checkpoint(model) -> None:
    """Undo :func:`enable_grad_checkpoint` for ``model``: its blocks run as stored-activation blocks
    again, and the block class gets its own ``__call__`` back once no block of it is flagged."""
    blocks = _blocks(model)
    cls = type(blocks[0])
    cleared = [b for b in blocks if grad_checkpoint_enabled(b)]
    for block in cleared:
        object.__delattr__(block, GRAD_CHECKPOINT_FLAG)
    left = max(0, _flagged_blocks.get(cls, 0) - len(cleared))
    _flagged_blocks[cls] = left
    if left == 0:
        _flagged_blocks.pop(cls, None)
        _unwrap_block_class(cls)


def grad_checkpoint_enabled(block) -> bool:
    """Whether ``block`` (one transformer block) is recomputed in the backward pass."""
    return bool(vars(block).get(GRAD_CHECKPOINT_FLAG, False))


@contextlib.contextmanager
def grad_checkpointing(model, enabled: bool = True):
    """Scoped gradient checkpointing: ``model``'s blocks are checkpointed inside the block only
    (nothing happens with ``enabled=False``, and a model already checkpointed on entry stays so)."""
    if not enabled or all(grad_checkpoint_enabled(b) for b in _blocks(model)):
        yield
        return
    enable_grad_checkpoint(model)
    try:
        yield
    finally:
        disable_grad_checkpoint(model)


# --------------------------------------------------------------------------- 3. packed attention


class PackingUnsupported(ValueError):
    """This model cannot train on packed rows (``packing: true``)."""


def segment_mask(segment_ids: mx.array, window_size: int | None = None) -> mx.array:
    """``(B, 1, T, T)`` boolean attention mask of packed rows: token ``i`` sees token ``j`` when both
    have the same segment id and ``j <= i`` (and ``i - j < window_size`` with a window)."""
    pos = mx.arange(segment_ids.shape[1])
    allowed = pos[:, None] >= pos[None]
    if window_size is not None:
        allowed = allowed & (pos[:, None] < pos[None] + window_size)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & allowed)[:, None]


def segment_positions(segment_ids: mx.array) -> mx.array:
    """``(B, T)`` position of every token within its own segment (0 at each segment's first token)."""
    pos = mx.arange(segment_ids.shape[1])
    starts = mx.concatenate([mx.ones((segment_ids.shape[0], 1), dtype=mx.bool_),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return pos - mx.cummax(mx.where(starts, pos, 0), axis=1)


def _rope_classes() -> tuple:
    """Rotary embedding classes whose ``__call__(x, offset, ...)`` hands ``offset`` to ``mx.fast.rope``
    unchanged (so one offset per token works)."""
    import mlx.nn as nn
    from mlx_lm.models import rope_utils

    names = ("SuScaledRoPE", "Llama3RoPE", "YarnRoPE", "ProportionalRoPE")
    return (nn.RoPE, *(getattr(rope_utils, n) for n in names if hasattr(rope_utils, n)))


def _per_token_rope(original, positions: mx.array):
    """A rotary ``__call__`` that rotates an input spanning the packed rows (``(B, ..., T, D)``,
    offset 0) token by token, by ``positions``; any other call goes to ``original``."""
    B, T = positions.shape
    flat = positions.reshape(-1)

    def call(self, x, offset=0, *args, **kwargs):
        if not (isinstance(offset, int) and offset == 0 and x.ndim >= 3 and x.shape[0] == B and x.shape[-2] == T):
            return original(self, x, offset, *args, **kwargs)
        tokens = mx.moveaxis(x, -2, 1)  # (B, T, ..., D): one "sequence" of length 1 per token
        out = original(self, tokens.reshape(B * T, -1, 1, x.shape[-1]), flat, *args, **kwargs)
        return mx.moveaxis(out.reshape(tokens.shape), 1, -2)

    return call


@contextlib.contextmanager
def packed_attention(model, segment_ids: mx.array | None):
    """Patch 3 (see the module docstring): inside the block ``model``'s forward pass attends within
    the segments of ``segment_ids`` (``(B, T)``) only. ``segment_ids=None``: does nothing."""
    if segment_ids is None:
        yield
        return
    masks: dict = {}  # one mask per window size, shared by every layer

    def create_attention_mask(h, cache=None, window_size=None, return_array=False):
        if h.shape[1] != segment_ids.shape[1]:
            raise PackingUnsupported(f"packing: the model attends over {h.shape[1]} positions, the packed "
                                     f"rows have {segment_ids.shape[1]}")
        if window_size not in masks:
            masks[window_size] = segment_mask(segment_ids, window_size)
        return masks[window_size]

    saved = [(mod, vars(mod)["create_attention_mask"]) for mod in _architecture_modules(model)
             if "create_attention_mask" in vars(mod)]
    if not saved:
        raise PackingUnsupported(f"packing: {type(model).__module__} builds no attention mask that packing can "
                                 "replace; set packing: false")
    ropes = sorted({type(m) for m in model.modules()} & set(_rope_classes()), key=lambda c: c.__qualname__)
    calls = [(cls, cls.__call__) for cls in ropes]
    positions = segment_positions(segment_ids)
    for mod, _ in saved:
        mod.create_attention_mask = create_attention_mask
    for cls, original in calls:
        cls.__call__ = _per_token_rope(original, positions)
    try:
        yield
    finally:
        for cls, original in reversed(calls):
            cls.__call__ = original
        for mod, fn in reversed(saved):
            mod.create_attention_mask = fn
    if not masks:
        raise PackingUnsupported(f"packing: the forward pass of {type(model).__module__} never asked for an "
                                 "attention mask; set packing: false")


def check_packing_supported(model) -> None:
    """Refuse (:class:`PackingUnsupported`) a model on which packed rows would not train like
    separate examples. A short probe: the logits of one example must not change when another
    example precedes it in the row (caught: recurrent or convolutional layers, masks built
    elsewhere), nor differ from the example alone (caught: absolute position embeddings).
    Chunked attention (``attention_chunk_size``) is refused by name."""
    name = type(model).__module__
    if any(getattr(m, "attention_chunk_size", None) or getattr(getattr(m, "args", None), "attention_chunk_size", None)
           for m in model.modules()):
        raise PackingUnsupported(f"packing: {name} uses chunked attention (chunks at absolute positions); "
                                 "set packing: false")
    ids = mx.arange(24, dtype=mx.int32) % 37 + 3
    rows = mx.stack([ids, mx.concatenate([mx.full((8,), 5, dtype=mx.int32), ids[8:]])])  # two prefixes
    segments = mx.array([[1] * 8 + [2] * 16] * 2, dtype=mx.int32)
    was_training = model.training
    model.eval()
    try:
        with packed_attention(model, segments):
            packed = model(rows)[:, 8:]
        alone = model(ids[None, 8:])[0]
    finally:
        model.train(was_training)
    tolerance = 1e-3 if alone.dtype == mx.float32 else 2e-2  # of the largest logit; the real cases give O(1)
    scale = mx.maximum(mx.abs(alone).astype(mx.float32).max(), 1e-6)
    leak = (mx.abs(packed[0] - packed[1]).astype(mx.float32).max() / scale).item()
    shift = (mx.abs(packed[0] - alone).astype(mx.float32).max() / scale).item()
    if leak > tolerance or shift > 10 * tolerance:
        why = "examples in one row influence each other" if leak > tolerance else \
            "its output depends on where an example starts in the row (absolute positions)"
        raise PackingUnsupported(f"packing: {name} cannot be packed: {why} (probe difference "
                                 f"{max(leak, shift):.2g}); set packing: false")
