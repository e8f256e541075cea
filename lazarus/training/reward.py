"""Reward modelling: a scalar head on a language model, trained on preference pairs (Bradley-Terry).

The reward of a sequence is a linear head (``score``, ``nn.Linear(hidden, 1)``, zero-initialised)
on the model's final hidden state at the last real token of ``prompt + response`` (the response's
end token). Per pair, with ``r_c``/``r_r`` the rewards of the chosen and rejected sequences and
``m`` the pair's optional ``margin`` column (0 without one)::

    loss = mean(-log sigmoid(r_c - r_r - m)) + center_rewards_coefficient * mean((r_c + r_r)^2)

as TRL's ``RewardTrainer``; logged: ``loss``, ``accuracy`` (share of pairs with ``r_c > r_r``),
``margin`` (mean ``r_c - r_r``), ``mean_reward``, ``min_reward``, ``max_reward`` (over both sides).

The trained model loads as a reward model (:func:`lazarus.models.load_reward_model`): ``train()``
ends by writing ``<checkpoint_dir>/reward_model/``, and GRPO/PPO take it as ``reward_model=``,
where :class:`RewardModel` scores ``(prompt, completion)`` texts as one more reward function.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from pydantic import Field

from lazarus.data import DataError, PreferenceDataset
from lazarus.data.chat import has_chat_template, prompt_ids, reply_ids
from lazarus.models.lora import lora_settings
from lazarus.training.base import Trainer, TrainerConfig
from lazarus.step import eval_mode
from lazarus.training.generation import pad_token_id
from lazarus.training.ppo import PolicyWithValueHead, load_with_head

#: The name a reward model's scores are logged under by GRPO/PPO (``rewards/reward_model``).
REWARD_MODEL_NAME = "reward_model"


def bradley_terry_loss(chosen, rejected, margin=None, center_rewards_coefficient: float | None = None):
    """Mean Bradley-Terry loss of paired rewards: ``-log sigmoid(r_c - r_r - margin)``, plus
    ``center_rewards_coefficient * mean((r_c + r_r)^2)`` when given (pulls rewards towards 0)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -nn.log_sigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def last_token_index(mask):
    """Index, in ``prompt + response`` (the batch's ``inputs[:, :1]`` followed by its ``targets``), of
    each row's last response token: one past the row's last column where ``mask`` is set."""
    cols = mx.arange(mask.shape[1], dtype=mx.int32)
    return (mx.where(mask > 0, cols, 0)).max(axis=1) + 1


class RewardModel(PolicyWithValueHead):
    """A language model with a scalar head: ``rewards(tokens, last)`` reads the final hidden state at
    ``last`` (each row's last real token; right padding after it changes nothing).

    The model's own modules keep their names (so its LoRA adapters and weights save and load as
    usual) beside ``score.weight`` / ``score.bias``. ``tokenizer`` (may be None: GRPO/PPO then use
    the policy's) and ``text_format`` (``use_chat_template``, ``system_prompt``: how the training
    pairs were tokenized) are what :meth:`score_texts` needs to turn texts into tokens the same way."""

    head_name = "score"

    def __init__(self, model: nn.Module, head: nn.Module | None = None, seed: int = 0, *, tokenizer=None,
                 text_format: dict | None = None):
        super().__init__(model, head, seed)
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "text_format", dict(text_format or {}))

    def rewards(self, tokens, last):
        """Rewards (float32, one per row) of ``tokens`` (B, T) read at positions ``last`` (B,)."""
        h = self.hidden_states(tokens)
        picked = h[mx.arange(tokens.shape[0]), last]
        return self[self.head_name](picked.astype(mx.float32))[:, 0]

    def encode(self, prompt: str | list[dict], completion: str, tokenizer=None) -> list[int]:
        """``prompt`` (a text, or chat messages) + ``completion`` as the training pairs were tokenized:
        the prompt through the chat template (when it was used), the completion as a finished reply
        (ending with its end token)."""
        tok = tokenizer or self.tokenizer
        use_template = self.text_format.get("use_chat_template")
        use_template = has_chat_template(tok) if use_template is None else bool(use_template)
        system = self.text_format.get("system_prompt")
        msgs = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system and msgs[0].get("role") != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        return prompt_ids(tok, msgs, use_template) + reply_ids(tok, msgs, completion, use_template)

    def score_ids(self, sequences: list[list[int]], pad_id: int = 0, batch_size: int = 32) -> np.ndarray:
        """Rewards of whole token sequences, in batches, in eval mode, without gradients."""
        out = np.zeros(len(sequences), dtype=np.float64)
        order = np.argsort([len(s) for s in sequences], kind="stable")  # similar lengths share a batch
        with eval_mode(self):
            for start in range(0, len(order), batch_size):
                rows = order[start: start + batch_size]
                width = -(-max(len(sequences[i]) for i in rows) // 8) * 8
                tokens = np.full((len(rows), width), pad_id, dtype=np.int32)
                for b, i in enumerate(rows):
                    tokens[b, : len(sequences[i])] = sequences[i]
                last = mx.array([len(sequences[i]) - 1 for i in rows], dtype=mx.int32)
                r = mx.stop_gradient(self.rewards(mx.array(tokens), last))
                out[rows] = np.array(r, dtype=np.float64)
        return out

    def score_texts(self, prompts: list[str], completions: list[str], tokenizer=None,
                    batch_size: int = 32) -> np.ndarray:
        """Rewards of ``(prompt, completion)`` texts (``tokenizer``: this model's own, else the one given)."""
        tok = self.tokenizer or tokenizer
        if tok is None:
            raise ValueError("this reward model has no tokenizer: pass tokenizer=")
        seqs = [self.encode(p, c, tok) for p, c in zip(prompts, completions)]
        return self.score_ids(seqs, pad_token_id(tok), batch_size)

    def as_reward_function(self, tokenizer=None, batch_size: int = 32):
        """A reward function (``fn(prompts, completions, **columns) -> list[float]``) named
        ``reward_model``: what GRPO/PPO call for ``reward_model=``."""

        def reward_model(prompts, completions, **columns):
            return self.score_texts(prompts, completions, tokenizer, batch_size).tolist()

        return reward_model


class RewardDataset(PreferenceDataset):
    """:class:`~lazarus.data.PreferenceDataset` that also keeps an optional numeric ``margin`` column
    per pair (TRL's): how much the chosen response should out-score the rejected one (0 where absent)."""

    has_margin = False

    def _encode_record(self, n, rec):
        margin = rec.get("margin")
        if margin is not None:
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise DataError(self.path, n, "margin", f"must be a finite number, got {margin!r}")
            if not self.has_margin:
                self.has_margin, self.margins = True, {}
            self.margins[n] = float(margin)
        return super()._encode_record(n, rec)

    def margin_of(self, index: int) -> float:
        """The ``margin`` of pair ``index`` (0.0 when its line has none)."""
        return self.margins.get(self.examples[index].line, 0.0) if self.has_margin else 0.0


class RewardConfig(TrainerConfig):
    """Reward model training (Bradley-Terry on preference pairs). ``batch_size`` counts pairs."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (TRL's RewardConfig default)")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Weight of mean((r_chosen + r_rejected)^2), which keeps rewards centred on 0 "
                                "(TRL; 0.01 is the usual value); None disables")


class RewardTrainer(Trainer):
    """``RewardTrainer(model, tokenizer, RewardConfig(...)).train(pairs)``: trains a scalar head (and
    the model, or its LoRA adapters) so that chosen responses out-score rejected ones.

    ``model`` is a language model (``load_model``; its untied ``lm_head`` is frozen: a reward model
    does not use it) or a :class:`RewardModel` to train further (one loaded frozen by
    ``load_reward_model`` is unfrozen: all its weights train). ``trainer.reward_model`` is the
    model + head the Loop trains; checkpoints hold both (``score.weight``/``score.bias`` beside the
    model's trainable weights). ``train()`` ends by writing the loadable reward model to
    ``<checkpoint_dir>/reward_model`` (rank 0; ``trainer.reward_model_dir``)."""

    config_class = RewardConfig
    dataset_class = RewardDataset

    def __init__(self, model, tokenizer, config: RewardConfig | None = None, callbacks=None, optimizer=None, *,
                 reference_model=None, head: nn.Module | None = None):
        reward_model = model if isinstance(model, RewardModel) else None
        model = reward_model.policy if reward_model is not None else model
        super().__init__(model, tokenizer, config, callbacks, optimizer, reference_model=reference_model)
        if reward_model is not None and not tree_flatten(reward_model.trainable_parameters()):
            reward_model.unfreeze()  # a loaded (frozen) reward model trains further: all of it
        if reward_model is None:
            reward_model = RewardModel(model, head, seed=self.config.seed, tokenizer=tokenizer)
        self.reward_model = reward_model
        self.reward_model_dir: Path | None = None
        self._freeze_lm_head()

    def _freeze_lm_head(self) -> None:
        lm_head = self.model.get("lm_head") if isinstance(self.model, dict) else None
        if isinstance(lm_head, nn.Module) and lora_settings(self.model) is None:
            lm_head.freeze()  # unused by the reward: no optimizer state for it

    def apply_precision(self):
        precision = super().apply_precision()
        self.reward_model.adopt_policy_modules()  # a dequantized lm_head is a new module
        self._freeze_lm_head()
        return precision

    def train_module(self):
        return self.reward_model

    def collate_fn(self, dataset, split: str):
        if not getattr(dataset, "has_margin", False):
            return dataset.collate

        def collate(indices, pad_multiple=8):
            batch = dataset.collate(indices, pad_multiple)
            batch["margin"] = mx.array([dataset.margin_of(i) for i in indices], dtype=mx.float32)
            return batch
        return collate

    def compute_loss(self, model, batch):
        mask = batch["mask"]
        tokens = mx.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
        rewards = model.rewards(tokens, last_token_index(mask))
        n = rewards.shape[0] // 2
        chosen, rejected = rewards[:n], rewards[n:]
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.config.center_rewards_coefficient)
        return loss, {"accuracy": (chosen > rejected).astype(mx.float32).mean(), "margin": (chosen - rejected).mean(),
                      "mean_reward": rewards.mean(), "min_reward": rewards.min(), "max_reward": rewards.max()}

    def train(self, dataset, eval_dataset=None, resume_from=None, allow_data_change: bool = False):
        dataset = self.as_dataset(dataset)
        fmt = {"use_chat_template": getattr(dataset, "use_chat_template", None),
               "system_prompt": getattr(dataset, "system_prompt", None)}
        object.__setattr__(self.reward_model, "text_format", fmt)
        result = super().train(dataset, eval_dataset, resume_from, allow_data_change)
        reason = result.stop_reason or ""
        finished = not (result.state.extras.get("terminated_on_nan") or reason.startswith("interrupted by"))
        if finished and self.loop.rank == 0:
            out = Path(result.checkpoint_dir or self.config.checkpoint_dir) / "reward_model"
            self.reward_model_dir = self.save_reward_model(out)
        return result

    def save_reward_model(self, directory: str | os.PathLike) -> Path:
        """Write the reward model (model with LoRA fused + head, in the save dtype; 4-bit layers of the
        base stay 4-bit unless ``dequantize: true``) as a folder :func:`lazarus.models.load_reward_model` loads."""
        from lazarus.models.reward_model import save_reward_model

        return save_reward_model(self.reward_model, self.tokenizer, directory,
                                 dequantize=self.config.dequantize is True,
                                 dtype=self.precision.save if self.precision else None)

    def load_checkpoint(self, path) -> None:
        """Load a reward checkpoint (model + head) or a bare model one (e.g. from SFT)."""
        load_with_head(path, self.reward_model)


__all__ = ["RewardConfig", "RewardTrainer", "RewardModel", "RewardDataset", "bradley_terry_loss",
           "last_token_index", "REWARD_MODEL_NAME"]
