"""Lazarus: MLX-native post-training (SFT, DPO, GRPO, PPO) on one callback-driven Loop."""

from lazarus import _blas

_blas.enable()  # must run before the first `import mlx.core`

from lazarus.state import State  # noqa: E402
from lazarus.loop import Loop, TrainResult  # noqa: E402

__all__ = ["Loop", "State", "TrainResult"]
__version__ = "0.1.0"
