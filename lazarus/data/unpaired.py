"""Unpaired feedback for KTO: ``{"prompt", "completion", "label": true|false}`` per record (TRL's format),
from any source :class:`SFTDataset` reads (JSONL, a JSON array, parquet, an mlx-lm folder, a list of
dicts, a ``datasets.Dataset``).

``label: true`` marks a desirable completion, ``false`` an undesirable one; no pairing is needed.
Tokenization, truncation and the ``file:line: field`` (or ``row``) errors are :class:`SFTDataset`'s (the
completion is the response). A collated batch also carries KTO's mismatched rows for the KL
estimate: each prompt followed by another example's completion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from lazarus.data.datasets import DataError, SFTDataset, SFTExample, _require_str


@dataclass
class UnpairedExample(SFTExample):
    label: bool = True


def next_token_rows(seqs: list[tuple[list[int], int]], pad_id: int, pad_multiple: int):
    """``(inputs, targets, mask)`` numpy arrays of ``(token ids, prompt length)`` rows: targets are
    the ids shifted by one, the mask is 1 on completion targets only (never on padding)."""
    width = -(-(max(len(ids) for ids, _ in seqs) - 1) // pad_multiple) * pad_multiple
    inputs = np.full((len(seqs), width), pad_id, np.int32)
    targets = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.float32)
    for row, (ids, prompt_len) in enumerate(seqs):
        end = len(ids) - 1
        inputs[row, :end], targets[row, :end] = ids[:-1], ids[1:]
        mask[row, prompt_len - 1: end] = 1.0
    return inputs, targets, mask


class UnpairedDataset(SFTDataset):
    """Desirable and undesirable completions, ``{"prompt", "completion", "label"}`` per record (KTO).

    Same options and rules as :class:`SFTDataset` (chat template, ``max_length``, ``truncation``).
    ``collate(indices)`` returns the examples' rows, then one KL row per example: its prompt with
    the completion of ``kl_partner[i]`` (set by the KTO trainer: the previous member of the
    example's batch), or, without ``kl_partner``, of the previous index in ``indices`` (cyclic,
    as TRL). ``label`` is 1.0 (desirable) or 0.0; ``loss_weight`` is the number of examples."""

    def __init__(self, path, tokenizer, *, max_length: int | None = None, use_chat_template: bool | None = None,
                 system_prompt: str | None = None, truncation: str = "truncate"):
        #: the example whose completion makes each example's KL row (None: the previous in the batch)
        self.kl_partner: np.ndarray | None = None
        super().__init__(path, tokenizer, max_length=max_length, use_chat_template=use_chat_template,
                         system_prompt=system_prompt, truncation=truncation)

    def _encode_record(self, n, rec) -> UnpairedExample | None:
        prompt = _require_str(self.path, n, rec, "prompt")
        completion = _require_str(self.path, n, rec, "completion")
        if "label" not in rec:
            raise DataError(self.path, n, "label", "missing (true for a desirable completion, false otherwise)")
        if not isinstance(rec["label"], bool):
            raise DataError(self.path, n, "label", f"must be true or false, got {json.dumps(rec['label'])}")
        fitted = self._fit(n, "prompt", self.encode_prompt(prompt), self.encode_response(completion, prompt))
        return None if fitted is None else UnpairedExample(fitted.ids, fitted.prompt_len, n, rec["label"])

    def _refit(self, n, e: UnpairedExample) -> UnpairedExample | None:
        fitted = super()._refit(n, e)
        return None if fitted is None else UnpairedExample(fitted.ids, fitted.prompt_len, n, e.label)

    def labels(self) -> np.ndarray:
        """The examples' labels (bool array)."""
        return np.array([e.label for e in self.examples], dtype=bool)

    def collate(self, indices, pad_multiple: int = 8) -> dict:
        import mlx.core as mx

        idx = [int(i) for i in indices]
        partners = [int(self.kl_partner[i]) for i in idx] if self.kl_partner is not None else idx[-1:] + idx[:-1]
        rows = [self.examples[i] for i in idx]
        seqs = [(e.ids, e.prompt_len) for e in rows]
        for e, j in zip(rows, partners):  # the KL rows, cut to max_length like any example
            other = self.examples[j]
            seqs.append(((e.ids[: e.prompt_len] + other.ids[other.prompt_len:])[: self.max_length], e.prompt_len))
        inputs, targets, mask = next_token_rows(seqs, self.pad_id, pad_multiple)
        n = len(idx)
        return {"inputs": mx.array(inputs), "targets": mx.array(targets), "mask": mx.array(mask),
                "label": mx.array([float(e.label) for e in rows]), "loss_weight": mx.array(float(n)),
                "num_tokens": int(mask[:n].sum()), "indices": idx}
