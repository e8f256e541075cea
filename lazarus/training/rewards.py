"""Reward functions for online RL (GRPO, PPO).

A reward function scores one rollout batch at a time::

    def reward_fn(prompts: list[str], completions: list[str], **columns) -> list[float]: ...

``prompts[i]`` is the prompt text that produced ``completions[i]`` (a prompt appears
``group_size`` times in a row); ``columns`` holds the prompt dataset's other columns,
aligned the same way (e.g. ``answer=[...]``). Return one number per completion, or
``None`` where the function does not apply (it then does not count for that completion).

Several functions can be combined with weights; the total reward is the weighted sum. A trained
reward model (``reward_model=``) joins them as one more function, named ``reward_model``, scored
after the others (:func:`model_reward`).
A function that raises, returns the wrong number of values or a non-number is reported
with a :class:`RewardError` that names it.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np

RewardFn = Callable[..., Sequence[float]]


class RewardError(ValueError):
    """A reward function failed or returned something unusable; ``name`` says which."""

    def __init__(self, name: str, problem: str):
        self.name = name
        super().__init__(f"reward function '{name}' {problem}")


def reward_name(fn) -> str:
    """The name a reward function is logged under (``rewards/<name>``)."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name


class RewardFunctions:
    """Several reward functions with weights, called once per rollout batch.

    ``__call__`` returns ``(total, per_function)``: the weighted sum per completion (NaN-free;
    ``None`` entries count as 0 in the sum) and each function's raw values (``None`` → NaN).
    """

    def __init__(self, funcs, weights: Sequence[float] | None = None):
        if callable(funcs):
            funcs = [funcs]
        funcs = list(funcs or [])
        if not funcs:
            raise ValueError("give at least one reward function (reward_fn=... or reward_funcs=[...])")
        for f in funcs:
            if not callable(f):
                raise TypeError(f"reward functions must be callable, got {type(f).__name__}")
        if weights is None:
            weights = [1.0] * len(funcs)
        weights = [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries but there are {len(funcs)} reward functions")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward_weights must be finite numbers, got {weights}")
        self.funcs = funcs
        self.weights = weights
        self.names: list[str] = []
        for f in funcs:
            base = reward_name(f)
            name, k = base, 2
            while name in self.names:
                name, k = f"{base}_{k}", k + 1
            self.names.append(name)

    def __len__(self) -> int:
        return len(self.funcs)

    def __call__(self, prompts: list[str], completions: list[str], columns: dict | None = None):
        n = len(completions)
        columns = columns or {}
        per: dict[str, np.ndarray] = {}
        for f, name in zip(self.funcs, self.names):
            try:
                out = f(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()})
            except RewardError:
                raise
            except Exception as e:  # noqa: BLE001 - user code; re-raised with its name
                raise RewardError(name, f"raised {type(e).__name__}: {e}") from e
            per[name] = self._validate(name, out, n)
        total = np.zeros(n, dtype=np.float64)
        for w, name in zip(self.weights, self.names):
            total += w * np.nan_to_num(per[name], nan=0.0)
        return total, per

    @staticmethod
    def _validate(name: str, out, n: int) -> np.ndarray:
        if out is None:
            raise RewardError(name, f"returned None; it must return a list of {n} numbers (one per completion)")
        if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
            out = out.tolist()  # numpy / mlx arrays
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
            raise RewardError(name, f"returned {type(out).__name__}; it must return a list of {n} numbers")
        if len(out) != n:
            raise RewardError(name, f"returned {len(out)} rewards for {n} completions")
        vals = np.empty(n, dtype=np.float64)
        for i, v in enumerate(out):
            if v is None:
                vals[i] = np.nan
                continue
            if isinstance(v, (bool, np.bool_)):
                v = float(v)
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise RewardError(name, f"returned a non-number at index {i}: {v!r}") from None
            if not math.isfinite(x):
                raise RewardError(name, f"returned a non-finite reward at index {i}: {x}")
            vals[i] = x
        return vals


def model_reward(reward_model):
    """``reward_model=`` of GRPO/PPO as a :class:`~lazarus.training.RewardModel` (frozen, eval mode):
    None stays None, a path is loaded with :func:`lazarus.models.load_reward_model`."""
    if reward_model is None:
        return None
    from lazarus.models.reward_model import load_reward_model
    from lazarus.training.reward import RewardModel

    if isinstance(reward_model, (str, os.PathLike)):
        reward_model = load_reward_model(reward_model)
    if not isinstance(reward_model, RewardModel):
        raise TypeError(f"reward_model must be a RewardModel (lazarus.models.load_reward_model) or the path of a "
                        f"saved one, got {type(reward_model).__name__}")
    reward_model.freeze()
    reward_model.eval()
    return reward_model


def exact_match(column: str = "answer", *, strip: bool = True, name: str | None = None) -> RewardFn:
    """A reward of 1.0 when the completion equals the dataset column ``column`` (after
    stripping whitespace when ``strip``), else 0.0. ``exact_match()`` reads ``answer``."""

    def reward(prompts, completions, **columns):
        if column not in columns:
            raise KeyError(f"the prompt dataset has no '{column}' column (has: {sorted(columns)})")
        out = []
        for c, a in zip(completions, columns[column]):
            a = "" if a is None else str(a)
            out.append(float((c.strip() == a.strip()) if strip else (c == a)))
        return out

    reward.__name__ = name or f"exact_match_{column}"
    return reward
