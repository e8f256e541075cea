"""Global-norm gradient clipping inside the compiled step."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_map

from lazarus.callbacks.base import Callback
from lazarus.tree_reductions import global_norm


class GradientClipping(Callback):
    """Rescale gradients so their global L2 norm is at most ``max_norm``.

    Runs as a pure gradient transform traced into the compiled step; the pre-clip norm is
    reported as the ``grad_norm`` metric.
    """

    order = 10

    def __init__(self, max_norm: float = 1.0):
        if max_norm <= 0:
            raise ValueError(f"GradientClipping max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def transform_grads(self, grads):
        norm = global_norm(grads)
        scale = mx.minimum(self.max_norm / (norm + 1e-6), 1.0)
        return tree_map(lambda g: g * scale.astype(g.dtype), grads), {"grad_norm": norm}
