"""Datasets (validated and tokenized once, from files, folders, lists or ``datasets.Dataset``, in
TRL's and mlx-lm's formats) and length-bucketed batching."""

from lazarus.data.batching import DataLoader
from lazarus.data.chat import chat_prompt_ids
from lazarus.data.datasets import (DataError, PreferenceDataset, PromptDataset, SFTDataset, read_jsonl)
from lazarus.data.sources import data_splits, load_records
from lazarus.data.unpaired import UnpairedDataset

__all__ = ["DataLoader", "DataError", "PreferenceDataset", "PromptDataset", "SFTDataset", "chat_prompt_ids",
           "read_jsonl", "UnpairedDataset", "data_splits", "load_records"]
