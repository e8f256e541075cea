"""Callbacks: everything that is not the objective."""

from lazarus.callbacks.base import EVENTS, Callback, Event
from lazarus.callbacks.checkpoint import Checkpoint
from lazarus.callbacks.early_stopping import EarlyStopping
from lazarus.callbacks.gradient_clipping import GradientClipping
from lazarus.callbacks.lr_schedule import LRSchedule
from lazarus.callbacks.progress_bar import ProgressBar
from lazarus.callbacks.tensorboard import TensorBoardLogger
from lazarus.callbacks.terminate_on_nan import TerminateOnNaN
from lazarus.callbacks.wandb_logger import WandbLogger

__all__ = ["EVENTS", "Callback", "Event", "Checkpoint", "EarlyStopping", "GradientClipping", "LRSchedule",
           "ProgressBar", "TensorBoardLogger", "TerminateOnNaN", "WandbLogger"]
