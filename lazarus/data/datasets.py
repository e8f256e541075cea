"""Datasets, validated and tokenized once at construction.

Data comes from any source :mod:`lazarus.data.sources` reads (JSONL, a JSON array, parquet, an
mlx-lm folder, a list of dicts, a ``datasets.Dataset``) in any format of
:mod:`lazarus.data.formats` (auto-detected, or ``format=``). Every problem with the input is a
:class:`DataError` naming the file and 1-based line (or the row of in-memory data) and the field,
raised before training starts (all the data is validated up front).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from lazarus.data.chat import conversation_ids
from lazarus.data.formats import (PREFERENCE_FORMATS, PROMPT_FORMATS, SFT_FORMATS, RowFormat, conversation_value,
                                  implicit_prompt, reply_value, text_value, turns_value)
from lazarus.data.sources import SUPPORTED_SUFFIXES, DataError, load_records, read_jsonl  # noqa: F401
from lazarus.data.tokenizing import CHARS_PER_TOKEN_BOUND, _Tokenizing, _validate_all  # noqa: F401

_require_str = text_value  # the name unpaired.py imports


@dataclass
class SFTExample:
    ids: list[int]
    prompt_len: int
    line: int | None = None  # the record's key: 1-based line in a JSONL file, else its 0-based row
    #: ``(start, end)`` token ranges trained when there are several (multi-turn); None: all after the prompt
    spans: list[tuple[int, int]] | None = field(default=None, kw_only=True)


class SFTDataset(_Tokenizing):
    """Supervised examples; one record is one of (auto-detected, or ``format=``; see
    :mod:`lazarus.data.formats`):

    * ``{"prompt", "response"}`` or ``{"prompt", "completion"}``: the prompt (text or chat messages)
      masked, the reply (text, or messages starting with an assistant turn) trained;
    * ``{"messages": [...]}`` (optional ``tools``): every assistant turn trained, the system, user
      and tool turns masked (``assistant_only=False``: every token trained);
    * ``{"text"}``: every token trained (EOS appended).

    ``data`` is a path (``.jsonl``, ``.json``, ``.parquet``, an mlx-lm folder), a list of dicts or a
    ``datasets.Dataset``. Prompts go through the tokenizer's chat template when it has one
    (``use_chat_template=False`` turns this off); each response is the template's assistant turn
    and ends with one end token (the template's end of turn, or EOS). Examples
    longer than ``max_length`` are truncated (``truncation="truncate"``, counted and warned)
    or dropped (``"drop"``); a prompt that alone reaches ``max_length`` is an error. Trainers
    apply the model's context (``max_position_embeddings``) when ``max_length`` is None, so no
    input line can make a batch too long for the model (see :meth:`limit_length`).
    """

    def __init__(self, data, tokenizer, *, max_length: int | None = None, mask_prompt: bool = True,
                 use_chat_template: bool | None = None, system_prompt: str | None = None,
                 truncation: str = "truncate", format: str | None = None, assistant_only: bool = True):
        super().__init__(tokenizer, max_length, use_chat_template, system_prompt)
        self.mask_prompt = mask_prompt
        self.assistant_only = assistant_only
        self.row_format = RowFormat(SFT_FORMATS, format, "SFT")
        self.last_turn_only: list = []  # keys of conversations trained on their last assistant turn only
        self._build(data, truncation, "examples")
        if self.last_turn_only:
            why = ("the chat template does not render them prefix by prefix (the rendering up to an assistant "
                   "turn does not start with the rendering before it)") if self.use_chat_template else \
                "there is no chat template"
            warnings.warn(f"{self.path}: {len(self.last_turn_only)} conversations with several assistant turns "
                          f"train only their last one: {why}; first: {self.path.where(self.last_turn_only[0])}",
                          stacklevel=2)

    def _encode_record(self, n, rec) -> SFTExample | None:
        fmt = self.row_format.of(self.path, n, rec)
        if fmt == "text":
            text = text_value(self.path, n, rec, "text")
            cut = self._cut(text)
            ids = list(self.tokenizer.encode(cut, add_special_tokens=True))
            if len(cut) == len(text) and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)
            return self._fit(n, "text", ids[:1], ids[1:])
        if fmt == "messages":
            msgs, tools = conversation_value(self.path, n, rec)
            ids, prompt_len, spans = self._conversation(n, msgs, tools)
            if not self.assistant_only:
                prompt_len, spans = 1, None
            return self._fit(n, "messages", ids[:prompt_len], ids[prompt_len:], spans)
        prompt = turns_value(self.path, n, rec, "prompt")
        reply = "response" if fmt == "prompt_response" else "completion"
        p, r = self.encode_pair(n, reply, prompt, reply_value(self.path, n, rec, reply, prompt))
        return self._fit(n, "prompt", p, r)

    def _conversation(self, n, msgs: list[dict], tools) -> tuple[list[int], int, list | None]:
        """``(ids, prompt_len, spans)`` of a conversation: several assistant turns (or tools) through
        :func:`~lazarus.data.chat.conversation_ids`, else (or when that fails) its last turn only."""
        turns = sum(m["role"] == "assistant" for m in msgs)
        if self.use_chat_template and (turns > 1 or tools):
            got = conversation_ids(self.tokenizer, self._messages(msgs), tools)
            if got is not None:
                ids, spans = got
                return ids, spans[0][0], (spans if len(spans) > 1 else None)
        if turns > 1:
            self.last_turn_only.append(n)
        p = self.encode_prompt(msgs[:-1], tools)
        return p + self.encode_response(msgs[-1].get("content") or "", msgs[:-1], tools), len(p), None

    def _fit(self, n, field, p, r, spans=None) -> SFTExample | None:
        if self.max_length is not None:
            if len(p) >= self.max_length:
                raise self._too_long(n, field, len(p))
            if len(p) + len(r) > self.max_length or (r and not self._ended(r)):
                if self.truncation == "drop":
                    self.num_dropped += 1
                    return None
                self.num_truncated += 1
                r = r[: self.max_length - len(p)]
                end = len(p) + len(r)
                spans = [(s, min(e, end)) for s, e in spans if s < end] if spans else spans
        return SFTExample(p + r, len(p), n, spans=spans)

    def _refit(self, n, e: SFTExample) -> SFTExample | None:
        return self._fit(n, None, e.ids[: e.prompt_len], e.ids[e.prompt_len:], e.spans)

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> np.ndarray:
        return np.array([len(e.ids) for e in self.examples])

    def target_ranges(self, e: SFTExample) -> list[tuple[int, int]]:
        """The ``[start, end)`` target positions of ``e`` in the loss (target ``t`` is ``e.ids[t + 1]``):
        the reply (every assistant turn of a conversation), or all of them with ``mask_prompt=False``."""
        n = len(e.ids) - 1
        if not self.mask_prompt:
            return [(0, n)]
        if e.spans is None:
            return [(e.prompt_len - 1, n)]
        return [(s - 1, t - 1) for s, t in e.spans]

    def collate(self, indices, pad_multiple: int = 8) -> dict:
        """Next-token batch: ``inputs``/``targets`` shifted by one, ``mask`` true on response
        targets only (or all real targets when ``mask_prompt=False``), never on padding."""
        import mlx.core as mx

        rows = [self.examples[i] for i in indices]
        width = max(len(r.ids) for r in rows) - 1
        width = -(-width // pad_multiple) * pad_multiple
        inputs = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        targets = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.float32)
        for b, r in enumerate(rows):
            n = len(r.ids) - 1
            inputs[b, :n] = r.ids[:-1]
            targets[b, :n] = r.ids[1:]
            for start, end in self.target_ranges(r):
                mask[b, start:end] = 1.0
        ntok = int(mask.sum())
        return {"inputs": mx.array(inputs), "targets": mx.array(targets), "mask": mx.array(mask),
                "loss_weight": mx.array(float(ntok)), "num_tokens": ntok, "indices": list(indices)}


@dataclass
class PreferenceExample:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    line: int | None = None


class PreferenceDataset(_Tokenizing):
    """Preference pairs (DPO): ``{"prompt", "chosen", "rejected"}`` (texts or chat messages), or
    TRL's implicit prompt, ``{"chosen", "rejected"}`` as whole conversations (or texts) whose shared
    start is the prompt. ``data`` and the options are as for :class:`SFTDataset`."""

    def __init__(self, data, tokenizer, *, max_length: int | None = None, use_chat_template: bool | None = None,
                 system_prompt: str | None = None, truncation: str = "truncate", format: str | None = None):
        super().__init__(tokenizer, max_length, use_chat_template, system_prompt)
        self.row_format = RowFormat(PREFERENCE_FORMATS, format, "preference")
        self._build(data, truncation, "pairs")

    def _encode_record(self, n, rec):
        if self.row_format.of(self.path, n, rec) == "preference":
            prompt = turns_value(self.path, n, rec, "prompt")
            chosen = reply_value(self.path, n, rec, "chosen", prompt)
            rejected = reply_value(self.path, n, rec, "rejected", prompt)
        else:
            prompt, chosen, rejected = implicit_prompt(self.path, n, turns_value(self.path, n, rec, "chosen"),
                                                       turns_value(self.path, n, rec, "rejected"))
        p, c = self.encode_pair(n, "chosen", prompt, chosen)
        p_rejected, r = self.encode_pair(n, "rejected", prompt, rejected)
        if p_rejected != p:
            raise DataError(self.path, n, "rejected", "renders another prompt than 'chosen' (give both replies "
                                                      "the same way: texts, or one assistant message each)")
        return self._fit(n, "prompt", p, c, r)

    def _fit(self, n, field, p, c, r) -> PreferenceExample | None:
        if self.max_length is not None:
            if len(p) >= self.max_length:
                raise self._too_long(n, field, len(p))
            room = self.max_length - len(p)
            cut = any(x and not self._ended(x) for x in (c, r))
            if len(c) > room or len(r) > room or cut:
                if self.truncation == "drop":
                    self.num_dropped += 1
                    return None
                self.num_truncated += 1
                c, r = c[:room], r[:room]
        return PreferenceExample(p, c, r, n)

    def _refit(self, n, e: PreferenceExample) -> PreferenceExample | None:
        return self._fit(n, None, e.prompt, e.chosen, e.rejected)

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> np.ndarray:
        return np.array([len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in self.examples])

    def collate(self, indices, pad_multiple: int = 8) -> dict:
        """Chosen rows then rejected rows, so one forward pass scores both."""
        import mlx.core as mx

        seqs, starts = [], []
        for which in ("chosen", "rejected"):
            for i in indices:
                e = self.examples[i]
                seqs.append(e.prompt + getattr(e, which))
                starts.append(len(e.prompt) - 1)
        width = -(-(max(len(s) for s in seqs) - 1) // pad_multiple) * pad_multiple
        n = len(seqs)
        inputs = np.full((n, width), self.pad_id, dtype=np.int32)
        targets = np.full((n, width), self.pad_id, dtype=np.int32)
        mask = np.zeros((n, width), dtype=np.float32)
        for b, (s, st) in enumerate(zip(seqs, starts)):
            inputs[b, : len(s) - 1] = s[:-1]
            targets[b, : len(s) - 1] = s[1:]
            mask[b, st: len(s) - 1] = 1.0
        return {"inputs": mx.array(inputs), "targets": mx.array(targets), "mask": mx.array(mask),
                "loss_weight": mx.array(float(len(indices))), "num_tokens": int(mask.sum()),
                "indices": list(indices)}


@dataclass
class PromptExample:
    prompt: str | list[dict]
    ids: list[int]
    columns: dict
    line: int | None = None


class PromptDataset(_Tokenizing):
    """Prompts for online RL: ``{"prompt": ..., <any other columns>}`` per record, the prompt a text
    or chat messages (TRL's prompt-only forms). The other columns (e.g. ``answer``) are passed to
    reward functions as keyword lists; ``prompts`` holds each prompt as given. ``data`` is any
    source :class:`SFTDataset` takes."""

    def __init__(self, data, tokenizer, *, max_length: int | None = None, use_chat_template: bool | None = None,
                 system_prompt: str | None = None, format: str | None = None):
        super().__init__(tokenizer, max_length, use_chat_template, system_prompt)
        self.row_format = RowFormat(PROMPT_FORMATS, format, "prompt")
        self.path, records = load_records(data)
        self.examples: list[PromptExample] = _validate_all(self.path, records, self._encode_record)
        cols = [set(e.columns) for e in self.examples]
        self.column_names = sorted(set.intersection(*cols)) if cols else []

    def _encode_record(self, n, rec):
        self.row_format.of(self.path, n, rec)
        prompt = turns_value(self.path, n, rec, "prompt")
        return self._refit(n, PromptExample(prompt, self.encode_prompt(prompt),
                                            {k: v for k, v in rec.items() if k != "prompt"}, n), "prompt")

    def _refit(self, n, e: PromptExample, field=None) -> PromptExample:
        if self.max_length is not None and len(e.ids) >= self.max_length:
            raise self._too_long(n, field, len(e.ids))
        return e

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> np.ndarray:
        return np.array([len(e.ids) for e in self.examples])

    def collate(self, indices, pad_multiple: int = 8) -> dict:
        rows = [self.examples[i] for i in indices]
        return {"prompts": [r.prompt for r in rows], "prompt_ids": [r.ids for r in rows],
                "columns": {c: [r.columns.get(c) for r in rows] for c in self.column_names},
                "indices": list(indices), "num_tokens": 0}
