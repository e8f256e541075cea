"""The Trainer base: owns model, tokenizer, config and callbacks; a paradigm adds ``compute_loss``."""

from __future__ import annotations

import os
import types
import typing
import warnings
from pathlib import Path
from typing import ClassVar, Literal

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from lazarus import checkpointing as ckpt
from lazarus.callbacks import (Callback, Checkpoint, GradientClipping, LRSchedule, ProgressBar,
                               TerminateOnNaN)
from lazarus.data import DataLoader
from lazarus.loop import Loop, TrainResult
from lazarus.models import fast_cpu
from lazarus.models.export import save_model_folder
from lazarus.models.loading import context_length
from lazarus.models.mlx_lm_patches import enable_grad_checkpoint
from lazarus.models.lora import lora_settings, save_adapters
from lazarus.models.precision import Precision, apply_precision, as_dtype, parameter_counts
from lazarus.protocols import DefaultHooks
from lazarus.ranks import Ranks


def token_logps(model, inputs, targets, temperature: float = 1.0):
    """Per-position log-prob of ``targets`` under ``softmax(model(inputs) / temperature)``, in float32."""
    return logps_from_logits(model(inputs), targets, temperature)


def logps_from_logits(logits, targets, temperature: float = 1.0):
    logits = logits.astype(mx.float32)
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - fast_cpu.log_normalizer(logits)


def _admits_bool(annotation) -> bool:
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_admits_bool(a) for a in typing.get_args(annotation))
    return False


class StrictConfig(BaseModel):
    """Base of every config: an unknown field, a boolean where a number is expected (pydantic
    would read ``batch_size: true`` as 1) and NaN/inf numbers (``learning_rate: .inf``) are
    errors naming the field, instead of a run that silently does something else."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("format", mode="after", check_fields=False)
    @classmethod
    def _known_format(cls, value):
        from lazarus.data.formats import ALIASES, PREFERENCE_FORMATS, PROMPT_FORMATS, SFT_FORMATS

        known = {*SFT_FORMATS, *PREFERENCE_FORMATS, *PROMPT_FORMATS, *ALIASES}
        if value is not None and value not in known:
            raise ValueError(f"unknown data format {value!r}; expected one of: {', '.join(sorted(known))}")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_non_bool(cls, value, info: ValidationInfo):
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if isinstance(value, bool) and field is not None and not _admits_bool(field.annotation):
            raise ValueError("true/false is not a valid value here")
        return value


class TrainerConfig(StrictConfig):
    """Fields shared by every trainer. Unknown or invalid fields are errors naming the field."""

    #: Fields a resumed run may set differently from its checkpoint: they change how long the run
    #: goes, what it writes and how fast it computes, not the trajectory. Any other difference is
    #: refused on resume (see lazarus.resume.check_same_config).
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset({
        "num_epochs", "max_steps", "checkpoint_interval", "checkpoint_dir", "keep_last", "log_interval",
        "eval_interval", "compile", "grad_checkpoint", "cpu_streams", "fast_cpu_kernels"})

    num_epochs: int = Field(3, ge=1, description="Passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps")
    batch_size: int = Field(4, ge=1, description="Global batch (examples per micro-step, split across ranks)")
    grad_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warmup")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None disables)")
    checkpoint_interval: int | None = Field(500, ge=1, description="Steps between saves (None disables)")
    checkpoint_dir: str = Field("checkpoints", description="Where step_N/best/final.safetensors go")
    keep_last: int | None = Field(None, ge=1, description="Keep only the newest N step_N checkpoints")
    log_interval: int = Field(10, ge=1, description="Steps between logged (averaged) metrics")
    eval_interval: int | None = Field(None, ge=1, description="Steps between evaluations of the eval set; "
                                         "None: after every epoch and at the end")
    seed: int = Field(0, description="Seeds data order, MLX, NumPy and Python RNGs")
    max_length: int | None = Field(None, ge=2, description="Token limit per example (None: the model's context, "
                                   "max_position_embeddings)")
    compile: bool = Field(True, description="mx.compile the training step")
    grad_checkpoint: bool = Field(False, description="Recompute block activations in backward (less memory)")
    cpu_streams: int | None = Field(None, ge=1, description="On MLX's CPU backend, split each batch into this many "
                                    "parts computed concurrently on CPU streams (None: 2 with >= 2 cores per rank)")
    fast_cpu_kernels: bool | Literal["auto"] = Field(
        "auto", description="On MLX's CPU backend, compute exp-heavy layers (SwiGLU, attention softmax, "
                            "log-softmax) with a vectorised exp; auto: only where it measured faster on this "
                            "machine (once, cached); no effect on GPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="What the model computes in; auto: float32 on MLX's CPU backend (half precision is "
                            "emulated there), the model's own dtype on a GPU")
    dequantize: bool | Literal["auto"] = Field(
        "auto", description="Replace frozen 4-bit layers by ordinary ones in the compute dtype; auto: on the CPU "
                            "backend when they fit in half the available memory (4-bit matmuls are slow there)")
    format: str | None = Field(
        None, description="Data format of the rows; None: detected from the first row (see training.md, "
                          "Data formats: messages, prompt_response, prompt_completion, text, preference, "
                          "implicit_preference, prompt; mlx-lm's chat, completions)")
    save_dtype: Literal["base", "float32", "bfloat16", "float16"] = Field(
        "base", description="dtype of checkpoints, adapters and model folders; base: the loaded model's")


class Trainer(DefaultHooks):
    """Base class. Subclasses supply ``compute_loss(model, batch) -> (loss, metrics)``.

    Default callbacks come from the config (LRSchedule, GradientClipping, Checkpoint,
    TerminateOnNaN, ProgressBar, plus EarlyStopping where a threshold is configured); a user
    callback of the same kind replaces the default one, others are added.
    """

    config_class: type[TrainerConfig] = TrainerConfig
    dataset_class = None  # what a path given to train() is turned into

    def __init__(self, model, tokenizer, config: TrainerConfig | None = None, callbacks: list[Callback] | None = None,
                 optimizer=None, *, reference_model=None):
        """Every trainer takes these as keywords (``cls(model=..., tokenizer=..., config=...,
        callbacks=..., reference_model=..., **paradigm_extras)``). A paradigm that compares
        against a frozen ``reference_model`` (DPO, GRPO, PPO) keeps it itself; one that has no
        use for it refuses one rather than ignoring it."""
        if reference_model is not None:
            raise TypeError(f"{type(self).__name__} does not use a reference model")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, TrainerConfig):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(self.config).__name__}")
        self.optimizer = optimizer
        self.callbacks = self._merge_callbacks(self.default_callbacks(), callbacks or [])
        self.loop: Loop | None = None
        self.precision: Precision | None = None  # set when training (or evaluation) first starts
        self._frozen_precisions: list[Precision] = []  # of frozen_models(), in order
        self._resumed_precision: dict | None = None  # the precision decisions of the checkpoint resumed from

    # ------------------------------------------------------------------ callbacks
    def default_callbacks(self) -> list[Callback]:
        c = self.config
        cbs: list[Callback] = [LRSchedule(c.warmup_steps, decay=c.lr_schedule), TerminateOnNaN(), ProgressBar(),
                               Checkpoint(c.checkpoint_dir, interval=c.checkpoint_interval, keep_last=c.keep_last)]
        if c.max_grad_norm is not None:
            cbs.append(GradientClipping(c.max_grad_norm))
        return cbs

    @staticmethod
    def _merge_callbacks(defaults, user) -> list[Callback]:
        for cb in user:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be lazarus.callbacks.Callback instances, got {type(cb).__name__}")
        user_types = [type(cb) for cb in user]
        kept = [d for d in defaults if not any(issubclass(t, type(d)) for t in user_types)]
        return kept + list(user)

    def get_callback(self, kind: type):
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)

    # ------------------------------------------------------------------ objective
    def compute_loss(self, model, batch):
        raise NotImplementedError("a Trainer subclass must implement compute_loss(model, batch)")

    # ------------------------------------------------------------------ data
    def max_length(self) -> int | None:
        """Token limit of one example: ``config.max_length``, else the model's context. Without a
        limit, one oversized line makes a batch the model cannot hold (MLX then dies natively)."""
        return self.config.max_length or context_length(self.model)

    def as_dataset(self, data):
        """``data`` as this trainer's dataset: a path (JSONL, JSON, parquet, an mlx-lm folder), a list of
        dicts or a ``datasets.Dataset`` becomes ``dataset_class`` (with the config's ``max_length``
        and data options, e.g. ``format``); a dataset object is used as it is."""
        from lazarus.data.formats import format_options
        from lazarus.data.sources import is_data_source

        if is_data_source(data):
            if self.dataset_class is None:
                raise TypeError(f"{type(self).__name__} needs a dataset object, not a path")
            return self.dataset_class(data, self.tokenizer, max_length=self.max_length(),
                                      **format_options(self.config, self.dataset_class))
        return data

    def _fit_to_context(self, dataset) -> None:
        """A dataset built without max_length gets the model's context applied (truncation warned,
        a prompt that cannot fit is a DataError naming its line)."""
        limit = context_length(self.model)
        if dataset is not None and limit and getattr(dataset, "max_length", 0) is None \
                and hasattr(dataset, "limit_length"):
            dataset.limit_length(limit, " (the model's context, max_position_embeddings)")

    def collate_fn(self, dataset, split: str):
        return dataset.collate

    def make_loader(self, dataset, split: str = "train") -> DataLoader:
        c = self.config
        return DataLoader(dataset, c.batch_size, shuffle=(split == "train"), seed=c.seed,
                          collate_fn=self.collate_fn(dataset, split))

    def prepare(self, train_loader, eval_loader, resuming: bool) -> None:
        """Hook before the loop starts (e.g. DPO's reference log-prob cache)."""

    # ------------------------------------------------------------------ training
    def train_module(self):
        """The module the Loop optimises and checkpoints (the model; PPO adds its value head)."""
        return self.model

    def make_optimizer(self):
        return optim.AdamW(learning_rate=self.config.learning_rate, weight_decay=self.config.weight_decay)

    def build_loop(self, train_loader, eval_loader=None, **kwargs) -> Loop:
        c = self.config
        if c.grad_checkpoint:
            enable_grad_checkpoint(self.model)
        return Loop(self.train_module(), self.optimizer or self.make_optimizer(), self.compute_loss, train_loader,
                    eval_data=eval_loader, eval_loss=getattr(self, "eval_loss", None), callbacks=self.callbacks,
                    max_steps=c.max_steps, num_epochs=c.num_epochs, grad_accumulation_steps=c.grad_accumulation_steps,
                    log_interval=c.log_interval, eval_interval=c.eval_interval, seed=c.seed, trainer=self,
                    config=c, compile=c.compile, cpu_streams=c.cpu_streams, **kwargs)

    def train(self, dataset, eval_dataset=None, resume_from: str | os.PathLike | None = None,
              allow_data_change: bool = False) -> TrainResult:
        """Train on ``dataset`` (a dataset object or a JSONL path); returns a TrainResult with
        ``history``, ``stop_reason`` and ``checkpoint_dir``. Resuming on training data whose
        tokens differ from the checkpoint's is refused unless ``allow_data_change``."""
        if resume_from is not None and self.precision is None:
            trainer_doc = (ckpt.peek_state_doc(resume_from) or {}).get("trainer")
            precision = trainer_doc.get("precision") if isinstance(trainer_doc, dict) else None
            self._resumed_precision = precision if isinstance(precision, dict) else {}
        self.apply_precision()
        dataset = self.as_dataset(dataset)
        eval_dataset = self.as_dataset(eval_dataset) if eval_dataset is not None else None
        self._fit_to_context(dataset)
        self._fit_to_context(eval_dataset)
        train_loader = self.make_loader(dataset, "train")
        train_loader.allow_data_change = allow_data_change
        eval_loader = self.make_loader(eval_dataset, "eval") if eval_dataset is not None else None
        self.loop = self.build_loop(train_loader, eval_loader)
        self.loop.state.run_info = self.run_info(dataset)
        self.loop.sync_ranks()  # before prepare(): reference caches and snapshots see rank 0's weights
        with fast_cpu.fast_cpu_kernels(self.model, self._use_fast_kernels(self.loop)):
            self.prepare(train_loader, eval_loader, resuming=resume_from is not None)
            self.model.train()
            try:
                return self.loop.fit(resume_from=resume_from)
            finally:
                self.model.eval()

    def evaluate(self, dataset) -> dict[str, float]:
        """Mean eval metrics of the current model on ``dataset``."""
        self.apply_precision()
        loader = self.make_loader(self.as_dataset(dataset), "eval")
        loop = self.build_loop(loader, loader, handle_signals=False)
        with fast_cpu.fast_cpu_kernels(self.model, self._use_fast_kernels(loop)):
            self.prepare(loader, loader, resuming=False)
            loop.callbacks = []
            return loop.evaluate()

    def _use_fast_kernels(self, loop: Loop) -> bool:
        """The ``fast_cpu_kernels`` setting as a decision; with ``auto`` only rank 0 measures (the
        kernels change float rounding, so every rank must run the same ones)."""
        return loop.ranks.rank0_choice(fast_cpu.resolve(self.config.fast_cpu_kernels) if loop.rank == 0 else False)

    # ------------------------------------------------------------------ precision
    def frozen_models(self) -> list:
        """Models that are run but not trained (a reference model): they get the same compute dtype."""
        ref = getattr(self, "reference_model", None)
        return [ref] if ref is not None else []

    def apply_precision(self) -> Precision:
        """Put the model (and any reference model) in the configured dtype policy, once (see
        :mod:`lazarus.models.precision`): on the CPU backend by default float32 compute with 4-bit
        layers dequantized; files are written in the base model's dtype."""
        if self.precision is None:
            c = self.config
            agree = Ranks().rank0_choice  # every rank takes rank 0's `auto` decision
            models = [self.model, *self.frozen_models()]
            choices = self._resumed_dequantize(len(models), agree)
            precisions = [apply_precision(m, dtype=c.dtype, dequantize=choice, agree=agree,
                                          **({"save_dtype": c.save_dtype,
                                              "full_fine_tune": lora_settings(m) is None} if m is self.model else {}))
                          for m, choice in zip(models, choices)]
            self.precision, self._frozen_precisions = precisions[0], precisions[1:]
        return self.precision

    def _dequantize_decisions(self) -> list[bool | None]:
        """Per model (the trained one, then each frozen one): whether its quantized layers were
        dequantized; None for a model without quantized layers."""
        return [p.dequantized_layers > 0 if p.quantized_layers else None
                for p in [self.precision, *self._frozen_precisions]]

    def _resumed_dequantize(self, count: int, agree) -> list:
        """The ``dequantize`` setting for each of ``count`` models. With ``dequantize: auto`` a
        resumed run keeps what its checkpoint decided per model, even where this machine's free
        memory would decide otherwise (the other choice is other math, or may not fit). Every rank
        takes rank 0's reading (two collectives per model, on every rank alike, even where one
        rank could not read the file)."""
        setting = self.config.dequantize
        if setting != "auto" or self._resumed_precision is None:
            return [setting] * count
        saved = self._resumed_precision.get("dequantized")
        saved = saved if isinstance(saved, list) else []
        choices = []
        for i in range(count):
            mine = saved[i] if i < len(saved) and isinstance(saved[i], bool) else None
            choices.append(agree(mine) if agree(mine is not None) else "auto")
        return choices

    def resume_state(self) -> tuple[dict, dict]:
        """Beside the Loop's own state: each model's ``dequantize`` decision, when any model has
        quantized layers (a resume takes them, see :meth:`apply_precision`). Subclasses that save
        more extend what this returns."""
        if self.precision is None or not any(d is not None for d in self._dequantize_decisions()):
            return {}, {}
        return {}, {"precision": {"dequantized": self._dequantize_decisions()}}

    def load_resume_state(self, arrays: dict, doc: dict) -> None:
        """Warn when this run's dequantize decisions differ from its checkpoint's (e.g. precision
        was applied by an ``evaluate()`` before ``train(resume_from=...)``). Subclasses that save
        more extend this."""
        saved = (doc.get("precision") or {}).get("dequantized") if isinstance(doc, dict) else None
        if isinstance(saved, list) and self.precision is not None and saved != self._dequantize_decisions():
            warnings.warn(f"the checkpoint's models were dequantized as {saved}, this run's as "
                          f"{self._dequantize_decisions()} (trained model first): the resumed run computes "
                          "differently; set dequantize explicitly to match", stacklevel=2)

    def weights_for_saving(self, weights: dict) -> dict:
        return weights if self.precision is None else as_dtype(weights, self.precision.save)

    def run_info(self, dataset) -> dict:
        """What this run trains, printed and logged at fit start (like mlx-lm's trainable-parameter line)."""
        trainable, total = parameter_counts(self.train_module())
        lora = lora_settings(self.model)
        info = {"trainable_parameters": trainable, "total_parameters": total,
                "precision": self.precision.describe() if self.precision else "as loaded",
                "lora": (f"rank {lora.rank}, scale {lora.scale:g}, dropout {lora.dropout:g}, "
                         f"{'all' if lora.num_layers < 0 else lora.num_layers} blocks") if lora else "off (full fine-tuning)",
                "examples": len(dataset)}
        lengths = getattr(dataset, "lengths", None)
        if callable(lengths):
            info["tokens"] = int(sum(lengths()))
        return info

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load the trainable weights saved in ``path`` (step_N/best/final.safetensors)."""
        weights, _ = ckpt.read_weights(path)
        expected = dict(tree_flatten(self.model.trainable_parameters()))
        ckpt.check_compatible(path, weights, expected)
        self.model.load_weights([(k, v.astype(expected[k].dtype)) for k, v in weights.items()], strict=False)
        mx.eval(self.model.parameters())

    def save_adapters(self, directory: str | os.PathLike) -> Path | None:
        """With LoRA, write mlx-lm's ``adapters.safetensors`` + ``adapter_config.json``."""
        if lora_settings(self.model) is None:
            return None
        return save_adapters(self.model, directory, dtype=self.precision.save if self.precision else None)

    def save_model(self, directory: str | os.PathLike, dequantize: bool = False) -> Path:
        """Write the model as a model folder (``config.json``, weights, tokenizer) that ``load_model``,
        ``mlx_lm.load``/``mlx_lm.generate`` and ``lazarus train --model`` accept: the full weights, or
        with LoRA the base with the adapters fused in. Weights are in the save dtype (the base
        model's unless ``save_dtype`` says otherwise); a 4-bit base stays 4-bit unless ``dequantize``."""
        return save_model_folder(self.model, self.tokenizer, directory, dequantize=dequantize,
                                 dtype=self.precision.save if self.precision else None)
