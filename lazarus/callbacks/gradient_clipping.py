"""Global-norm gradient clipping inside the compiled step."""

from __future__ import annotations

import mlx.optimizers as optim

from lazarus.callbacks.base import Callback


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
        clipped, norm = optim.clip_grad_norm(grads, self.max_norm)
        return clipped, {"grad_norm": norm}
