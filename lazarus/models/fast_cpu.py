"""Vectorisable exp for MLX's CPU backend, and the exp-heavy model pieces rebuilt on it.

Why: on the CPU backend MLX evaluates ``exp`` (and so ``sigmoid``, ``silu``, ``softmax``,
``logsumexp``) one element at a time through libm: ~12 ns per float32 on the 2-core x86 machine
we develop on, ~60x slower than a multiply. In a small llama that makes the SwiGLU activation
and the attention softmax cost more than all the matmuls of the forward pass. MLX's compiler,
however, fuses chains of multiplies, adds, integer casts and shifts into one loop that the C++
compiler vectorises. So ``fast_exp`` computes ``exp`` the textbook way with such ops: split
``x = n*ln2 + r`` (|r| <= ln2/2), a degree-7 polynomial for ``exp(r)`` (the classic Cephes
``expf`` coefficients, in Estrin's scheme) and ``2**n`` built from the float bits. It is ~3.5x
faster on this machine and within 4e-6 relative error of ``mx.exp`` (float32 rounding is ~1e-7).

The kernel choice of a run is an explicit value, :class:`CpuKernels` (fast or native).
``fast_cpu_kernels(model, enabled)`` is the *step kernel scope*: trainers enter it exactly where
the training/eval step is built and run (``Trainer.train`` / ``evaluate``, around ``prepare``
and ``Loop.fit``). Inside it, and only when MLX's default device is the CPU (GPU kernels are
already fast): the mlx-lm modules behind the model's layers call the SwiGLU and attention below
(the one monkey-patch involved lives in :mod:`lazarus.models.mlx_lm_patches`), and
:func:`log_normalizer` uses the fast ``logsumexp`` unless its caller passes its own
``kernels``. Since the step is traced inside the scope, the compiled graph holds the choice.
``fast_cpu_kernels: auto`` (the default) uses them only where a training step of a small llama
is measurably faster with them on this machine (:func:`kernels_pay_off`, measured once per
CPU/MLX/BLAS and cached; see :mod:`lazarus.autotune`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import mlx.core as mx

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds a float32 to the nearest integer
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split so n * _LN2_HI is exact
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_LO, _HI = -87.3, 88.7  # inputs are clamped to this range, which keeps 2**n a normal float
# Results below exp(-64) ~ 1.6e-28 are returned as exactly 0. Why: the clamp above would turn
# exp(-inf) (every masked attention score) into ~1.2e-38, and softmax then divides that by the
# row sum, giving *subnormal* floats. On Intel CPUs every FMA that touches a subnormal takes a
# microcode assist (~100x slower), so OpenBLAS's sgemm over half-subnormal attention
# probabilities made whole training steps 4-5x slower than MLX's own exp (measured on a Xeon
# with AVX-512; AMD Zen shows no penalty). exp(-64) is 1e-21 of float32's resolution next to
# the row maximum that softmax/logsumexp always contain, so flushing it changes no result, and
# any row sum up to 2**33 still divides it into a normal float.
_FLUSH_BELOW = -64.0
_ROUND_BITS = 0x4B400000  # the int32 bits of _ROUND


def _exp_forward(x):
    # Written so that MLX's fuser makes three short loops; it materialises any value that two
    # loops share, and a bit-cast (view) always ends a loop.
    # 1: t = x*log2(e) + 1.5*2**23: the float add rounds, so t - _ROUND is n = round(x / ln 2)
    #    and the low bits of t hold n itself.
    xc = mx.clip(x, _LO, _HI)  # keeps 2**n a normal float; also maps -inf/+inf into range
    t = xc * _LOG2E + _ROUND
    # 2: the float bits of 2**n, straight from the bits of t.
    two_n = mx.left_shift(t.view(mx.int32) - (_ROUND_BITS - 127), 23).view(mx.float32)
    # 3: exp(x) = 2**n * exp(r), r = x - n*ln2 in [-ln2/2, ln2/2]; exp(r) = 1 + r + r^2 q(r) with
    #    q in Estrin's scheme (a shallow expression fuses better than a deep Horner chain).
    n = t - _ROUND
    r = xc - n * _LN2_HI - n * _LN2_LO
    c0, c1, c2, c3, c4, c5 = _POLY
    r2 = r * r
    e = (r2 * ((c5 + c4 * r) + r2 * (c3 + c2 * r) + (r2 * r2) * (c1 + c0 * r)) + r + 1.0) * two_n
    return mx.where(x < _FLUSH_BELOW, 0.0, e)  # never a subnormal (see _FLUSH_BELOW)


@mx.custom_function
def _fast_exp(x):
    return _exp_forward(x)


@_fast_exp.vjp
def _fast_exp_vjp(primals, cotangent, output):
    return cotangent * output  # d exp(x) = exp(x) dx: exact, and no autodiff through the bit tricks


def _first(args):
    # MLX hands a one-input custom function's primals to its vjp/jvp as the bare array.
    return args[0] if isinstance(args, (list, tuple)) else args


def fast_exp(x: mx.array) -> mx.array:
    """``exp`` for float32 arrays built from vectorisable ops (see the module docstring); results
    below ``exp(-64)`` are exactly 0, so it never returns a subnormal float."""
    if x.dtype != mx.float32:
        return _fast_exp(x.astype(mx.float32)).astype(x.dtype)
    return _fast_exp(x)


def _sigmoid(x):
    # the argument is capped so that sigmoid(x) >= 1/(1 + exp(64)): never a subnormal (see _FLUSH_BELOW)
    return 1.0 / (1.0 + fast_exp(mx.minimum(-x, -_FLUSH_BELOW)))


@mx.custom_function
def _swiglu(gate, x):
    return gate * _sigmoid(gate) * x  # silu(gate) * x


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    # Recompute sigmoid(gate) instead of keeping autodiff's intermediates alive until backward:
    # one cheap exp buys several activation-sized arrays of peak memory.
    gate, x = primals
    s = _sigmoid(gate)
    silu = gate * s
    return cotangent * x * (s + silu * (1.0 - s)), cotangent * silu


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's ``swiglu`` (``silu(gate) * x``) on ``fast_exp``."""
    return _swiglu(gate, x)


def _softmax_last(x):
    # A row masked everywhere (the padding positions of a left-padded prompt) gives all zeros,
    # not 0/0 = NaN, which the next layer would spread to the real tokens.
    m = x.max(axis=-1, keepdims=True)
    e = fast_exp(x - mx.where(mx.isinf(m), 0.0, m))
    return e / mx.maximum(e.sum(axis=-1, keepdims=True), 1e-30)


@mx.custom_function
def _softmax(x):
    return _softmax_last(x)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    # The closed form: autodiff through exp and the division builds a longer, slower graph.
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """``mx.softmax`` on ``fast_exp``."""
    if axis in (-1, x.ndim - 1):
        return _softmax(x)
    return mx.moveaxis(_softmax(mx.moveaxis(x, axis, -1)), -1, axis)


@mx.custom_function
def _logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    m = mx.where(mx.isinf(m), 0.0, m)  # an all -inf row gives -inf, not nan
    return (mx.log(fast_exp(x - m).sum(axis=-1, keepdims=True)) + m).squeeze(-1)


@_logsumexp.vjp
def _logsumexp_vjp(primals, cotangent, output):
    return cotangent[..., None] * fast_exp(_first(primals) - output[..., None])


def logsumexp(x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
    """``mx.logsumexp`` on ``fast_exp``."""
    if axis not in (-1, x.ndim - 1):
        x = mx.moveaxis(x, axis, -1)
    out = _logsumexp(x)
    return mx.expand_dims(out, axis) if keepdims else out


def _sum_to_shape(g, shape):
    """Sum ``g`` over the axes that were broadcast to reach its shape from ``shape``."""
    axes = [i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1]
    return g.sum(axis=axes, keepdims=True) if axes else g


@mx.custom_function
def _attention_core(q, k, v, bias):
    """softmax(q @ k^T + bias) @ v over the last two axes; q is already scaled. Also returns the
    probabilities, so that the backward pass below can use them without recomputing."""
    probs = _softmax_last((q @ k.swapaxes(-1, -2)).astype(mx.float32) + bias)  # softmax in float32
    return probs.astype(v.dtype) @ v, probs


@_attention_core.vjp
def _attention_core_vjp(primals, cotangents, outputs):
    # The textbook attention backward: four matmuls and one pass over the probabilities, with
    # sum_j dP_ij P_ij computed as the cheaper sum_d dO_id O_id. Masked entries have P = 0, so
    # the mask needs no backward of its own (and gets no gradient).
    q, k, v, bias = primals
    d_out = cotangents[0]
    out, probs = outputs
    d_v = probs.astype(v.dtype).swapaxes(-1, -2) @ d_out
    d_dot = (d_out * out).astype(mx.float32).sum(axis=-1, keepdims=True)
    d_scores = (probs * ((d_out @ v.swapaxes(-1, -2)).astype(mx.float32) - d_dot)).astype(q.dtype)
    d_q = d_scores @ k
    d_k = d_scores.swapaxes(-1, -2) @ q
    return (d_q.astype(q.dtype), _sum_to_shape(d_k, k.shape).astype(k.dtype),
            _sum_to_shape(d_v, v.shape).astype(v.dtype), mx.zeros_like(bias))


def attention(queries, keys, values, scale: float, mask=None) -> mx.array:
    """Multi-head attention with ``softmax`` above. Shapes as ``mx.fast.scaled_dot_product_attention``:
    queries ``(B, Hq, L, D)``, keys/values ``(B, Hkv, S, D)`` with ``Hq`` a multiple of ``Hkv``;
    ``mask`` is None, ``"causal"`` (aligned to the last key, as with a KV cache), a boolean
    array (True = attend) or an additive float array."""
    B, Hq, L, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    rep = Hq // Hkv
    if rep == 1:
        q, k, v = queries * scale, keys, values
    else:  # grouped-query attention: each key/value head serves `rep` query heads
        q = (queries * scale).reshape(B, Hkv, rep, L, D)
        k, v = keys[:, :, None], values[:, :, None]
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        allowed = mx.arange(L)[:, None] + (S - L) >= mx.arange(S)[None]
        bias = mx.where(allowed, 0.0, -mx.inf)
    elif mask is None:
        bias = mx.zeros((1, 1))
    else:
        while mask.ndim < 4:  # broadcastable to (B, Hq, L, S), as for mx.fast.scaled_dot_product_attention
            mask = mask[None]
        if rep > 1:  # split the head axis like the queries
            mask = mask.reshape(mask.shape[0], -1, rep if mask.shape[1] == Hq else 1, *mask.shape[2:])
        bias = mx.where(mask, 0.0, -mx.inf) if mask.dtype == mx.bool_ else mask.astype(mx.float32)
    out, _ = _attention_core(q, k, v, bias)
    return out.reshape(B, Hq, L, D)


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    """Drop-in for ``mlx_lm.models.base.scaled_dot_product_attention``: quantized caches and
    attention sinks go to mlx-lm's own version."""
    if sinks is not None or hasattr(cache, "bits"):
        from mlx_lm.models.base import scaled_dot_product_attention as original
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    return attention(queries, keys, values, scale, mask)


def cpu_backend() -> bool:
    return mx.default_device() == mx.cpu


@dataclass(frozen=True)
class CpuKernels:
    """Which implementation of the exp-heavy pieces a step uses: ``fast=True`` the functions of
    this module, ``False`` MLX's own. A plain value: decide it once per run and hand it on."""

    fast: bool = False

    def log_normalizer(self, logits: mx.array, keepdims: bool = False) -> mx.array:
        """``logsumexp`` over the last axis with these kernels."""
        if self.fast:
            return logsumexp(logits, keepdims=keepdims)
        return mx.logsumexp(logits, axis=-1, keepdims=keepdims)


NATIVE = CpuKernels(fast=False)
FAST = CpuKernels(fast=True)

#: The step kernel scope's record: the kernels of every open ``fast_cpu_kernels`` block that
#: turned the fast kernels on, innermost last. Pushed and popped by :func:`fast_cpu_kernels` only;
#: read by :func:`step_kernels`. (A block that leaves them off pushes nothing: inside it, an
#: enclosing block's patched mlx-lm functions stay in place, and so does its choice here.)
_open_scopes: list[CpuKernels] = []


def step_kernels() -> CpuKernels:
    """The kernels of the step being built and run: those of the innermost open
    ``fast_cpu_kernels`` block that enabled them, else :data:`NATIVE`."""
    return _open_scopes[-1] if _open_scopes else NATIVE


def log_normalizer(logits: mx.array, keepdims: bool = False, kernels: CpuKernels | None = None) -> mx.array:
    """``logsumexp`` over the last axis with ``kernels``; by default those of the step kernel scope
    (:func:`step_kernels`): the fast one inside a ``fast_cpu_kernels`` block that enabled them.
    Trainers compute token log-probs with it."""
    return (step_kernels() if kernels is None else kernels).log_normalizer(logits, keepdims)


def _time_small_llama_step() -> tuple[float, float]:
    """Seconds per training step (forward + backward, compiled) of a small random llama with
    the kernels on and off: the measurement behind ``fast_cpu_kernels: auto``."""
    from lazarus import autotune
    from mlx_lm.models import llama

    from lazarus.rng import seeded_rng

    with seeded_rng(0):  # the random init below must not shift the run's own random numbers
        return _time_llama_step(autotune, llama)


def _time_llama_step(autotune, llama) -> tuple[float, float]:
    args = llama.ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=704,
                           num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=1024)
    model = llama.Model(args)
    key = mx.random.key(0)
    x = mx.random.randint(0, args.vocab_size, (8, 129), key=key)
    inputs, targets = x[:, :-1], x[:, 1:]

    params = model.trainable_parameters()

    def loss(p, inputs, targets):
        model.update(p)
        logits = model(inputs).astype(mx.float32)
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return (log_normalizer(logits) - picked).mean()

    with fast_cpu_kernels(model, True):
        fast = mx.compile(mx.value_and_grad(loss))
        mx.eval(fast(params, inputs, targets))  # traced with the kernels in place
    plain = mx.compile(mx.value_and_grad(loss))
    return autotune.best_of_alternating(lambda: mx.eval(fast(params, inputs, targets)),
                                        lambda: mx.eval(plain(params, inputs, targets)))


def kernels_pay_off() -> bool:
    """Whether the kernels make a training step faster on this machine (measured once, cached)."""
    from lazarus import autotune

    return autotune.decide("fast_cpu_kernels", _time_small_llama_step)


def resolve(setting: bool | str | CpuKernels) -> bool:
    """The config's ``fast_cpu_kernels`` (True, False or "auto", or a decided :class:`CpuKernels`)
    as a decision for this run."""
    if isinstance(setting, CpuKernels):
        return setting.fast
    if setting == "auto":
        return cpu_backend() and kernels_pay_off()
    return bool(setting)


@contextlib.contextmanager
def fast_cpu_kernels(model, enabled: bool | str | CpuKernels = True):
    """The step kernel scope (see the module docstring). Within the block, on the CPU backend only
    and when ``enabled`` resolves to True (``"auto"`` asks :func:`kernels_pay_off`): the mlx-lm
    modules behind ``model``'s layers use the SwiGLU and attention above
    (:func:`lazarus.models.mlx_lm_patches.fast_kernels_installed`) and :func:`step_kernels` is
    :data:`FAST`. Everything is restored on exit, so other models and later code are untouched.
    Yields whether the kernels are in use."""
    from lazarus.models.mlx_lm_patches import fast_kernels_installed

    if not cpu_backend() or not resolve(enabled):
        yield False
        return
    with fast_kernels_installed(model):
        _open_scopes.append(FAST)
        try:
            yield True
        finally:
            _open_scopes.pop()
