"""Reward models on disk: a model folder plus the scalar head.

A reward model folder is a complete model folder (``config.json``, weights with any LoRA adapters
fused in, tokenizer: what :func:`lazarus.models.save_model_folder` writes, so ``load_model`` and
mlx-lm read it too) with two more files:

* ``reward_head.safetensors``: the head, ``score.weight`` (1, hidden) and ``score.bias`` (1,),
  in the same dtype as the weights (the base model's, unless told otherwise);
* ``reward_model.json``: ``{"format": "lazarus-reward-model", "version": 1, "head":
  "reward_head.safetensors", "hidden_size": H, "text_format": {"use_chat_template": ...,
  "system_prompt": ...}}``; ``text_format`` says how the training pairs were tokenized, so texts
  are scored the same way. It is written last: a folder without it is not a reward model.

``RewardTrainer.train()`` writes one to ``<checkpoint_dir>/reward_model``; :func:`load_reward_model`
accepts that folder, the checkpoint folder above it, or a ``lazarus train reward`` run folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from lazarus.checkpointing import atomic_write_text
from lazarus.models.export import save_model_folder
from lazarus.models.loading import ModelLoadError, load_model
from lazarus.models.precision import DTYPES, as_dtype

FORMAT = "lazarus-reward-model"
META_FILE = "reward_model.json"
HEAD_FILE = "reward_head.safetensors"


def save_reward_model(reward_model, tokenizer, directory: str | os.PathLike, *, dtype: mx.Dtype | None = None,
                      dequantize: bool = False, source_dir: str | os.PathLike | None = None) -> Path:
    """Write ``reward_model`` (a :class:`lazarus.training.RewardModel`) to ``directory``: its language
    model as a model folder (LoRA fused; ``dtype`` default: the base model's; a 4-bit base stays
    4-bit unless ``dequantize``) plus the head and ``reward_model.json``. Returns the folder."""
    out = save_model_folder(reward_model.policy, tokenizer, directory, dtype=dtype, dequantize=dequantize,
                            source_dir=source_dir)
    head = dict(tree_flatten(reward_model[reward_model.head_name].parameters()))
    weights = {f"score.{k}": v for k, v in head.items()}
    if dtype is None:  # the folder's weights' dtype
        config = json.loads((out / "config.json").read_text())
        dtype = DTYPES.get(str(config.get("torch_dtype")), mx.float32)
    mx.save_safetensors(str(out / HEAD_FILE), as_dtype(weights, dtype), metadata={"format": "mlx"})
    meta = {"format": FORMAT, "version": 1, "head": HEAD_FILE, "hidden_size": int(weights["score.weight"].shape[-1]),
            "text_format": dict(getattr(reward_model, "text_format", {}) or {})}
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
    return out


def find_reward_model(path: str | os.PathLike) -> Path:
    """The reward model folder at ``path``: the folder itself, its ``reward_model/`` (a checkpoint
    folder) or its ``checkpoints/reward_model/`` (a run folder)."""
    p = Path(path)
    for cand in (p, p / "reward_model", p / "checkpoints" / "reward_model"):
        if (cand / META_FILE).is_file():
            return cand
    raise ModelLoadError(f"no reward model at {p}: expected {META_FILE} there, in {p / 'reward_model'} or in "
                         f"{p / 'checkpoints' / 'reward_model'} (RewardTrainer.train() writes one)")


def load_reward_model(path: str | os.PathLike):
    """Load a reward model saved by :func:`save_reward_model` (or by ``RewardTrainer.train()``):
    returns a :class:`lazarus.training.RewardModel` (frozen weights as saved, head in float32) with
    its tokenizer as ``.tokenizer``; score texts with ``rm.score_texts(prompts, completions)``, or
    pass it to GRPO/PPO as ``reward_model=``."""
    from lazarus.training.reward import RewardModel  # training builds on models: imported when used

    folder = find_reward_model(path)
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{folder / META_FILE} is not a Lazarus reward model description")
    model, tokenizer = load_model(folder)
    head = mx.load(str(folder / meta.get("head", HEAD_FILE)))
    rm = RewardModel(model, tokenizer=tokenizer, text_format=meta.get("text_format"))
    expected = dict(tree_flatten(rm[rm.head_name].parameters()))
    got = {k.removeprefix("score."): v for k, v in head.items()}
    if set(got) != set(expected) or any(got[k].shape != expected[k].shape for k in got):
        raise ModelLoadError(f"{folder / HEAD_FILE} does not match the model (hidden size "
                             f"{expected['weight'].shape[-1]})")
    rm[rm.head_name].load_weights([(k, v.astype(mx.float32)) for k, v in got.items()])
    rm.freeze()
    mx.eval(rm.parameters())
    return rm


__all__ = ["save_reward_model", "load_reward_model", "find_reward_model"]
