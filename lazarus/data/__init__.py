"""Datasets (strict JSONL, tokenized once) and length-bucketed batching."""

from lazarus.data.batching import DataLoader
from lazarus.data.chat import chat_prompt_ids
from lazarus.data.datasets import (DataError, PreferenceDataset, PromptDataset, SFTDataset, read_jsonl)
from lazarus.data.unpaired import UnpairedDataset

__all__ = ["DataLoader", "DataError", "PreferenceDataset", "PromptDataset", "SFTDataset", "chat_prompt_ids",
           "read_jsonl", "UnpairedDataset"]
