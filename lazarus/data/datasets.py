"""Strict JSONL datasets, tokenized once at construction.

Every problem with the input is a :class:`DataError` naming the file, the 1-based line and
the field, raised before training starts (the whole file is validated up front).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from lazarus.data.chat import has_chat_template, prompt_ids, reply_ids, stop_ids

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".ndjson")
#: A text longer than ``max_length * CHARS_PER_TOKEN_BOUND`` characters is cut to that many before
#: tokenizing: it cannot fit anyway, and tokenizing a multi-megabyte line would take seconds.
CHARS_PER_TOKEN_BOUND = 64


class DataError(ValueError):
    """Bad training data. ``file``, ``line`` (1-based, or None) and ``field`` say where."""

    def __init__(self, file, line: int | None, field: str | None, problem: str, more: int = 0):
        self.file, self.line, self.field, self.problem = str(file), line, field, problem
        where = self.file + (f":{line}" if line is not None else "")
        what = f" field '{field}':" if field else ""
        extra = f" (and {more} more bad line{'s' if more != 1 else ''})" if more else ""
        super().__init__(f"{where}:{what} {problem}{extra}")


def read_jsonl(path) -> list[tuple[int, dict]]:
    """Parse a JSONL file into ``(line_number, record)`` pairs; blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    if path.is_dir():
        raise DataError(path, None, None, "is a directory, expected a .jsonl file")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(path, None, None, f"unsupported file type '{path.suffix}'; expected JSON Lines (.jsonl)")
    records, errors = [], []
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
        raw = raw[3:]
    # Split on newline bytes only: JSON strings may hold U+2028 and friends, which str.splitlines
    # would treat as line breaks.
    for n, data in enumerate(raw.split(b"\n"), start=1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(DataError(path, n, None, f"not UTF-8 text (byte 0x{data[e.start]:02x} at byte "
                                                   f"{e.start + 1} of the line)"))
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(DataError(path, n, None, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        except RecursionError:
            errors.append(DataError(path, n, None, "malformed JSON (nested too deeply)"))
            continue
        if not isinstance(rec, dict):
            errors.append(DataError(path, n, None, f"expected a JSON object, got {type(rec).__name__}"))
            continue
        records.append((n, rec))
    if errors:
        first = errors[0]
        raise DataError(first.file, first.line, first.field, first.problem, more=len(errors) - 1)
    if not records:
        raise DataError(path, None, None, "file is empty (no records)")
    return records


def _require_str(path, n, rec, field) -> str:
    if field not in rec:
        raise DataError(path, n, field, "missing")
    v = rec[field]
    if not isinstance(v, str):
        raise DataError(path, n, field, f"must be a string, got {type(v).__name__}")
    if not v.strip():
        raise DataError(path, n, field, "is empty")
    return v


def _validate_all(path, records, fn):
    """Run ``fn(n, rec)`` on every record; collect errors so the report counts them all."""
    out, errors = [], []
    for n, rec in records:
        try:
            out.append(fn(n, rec))
        except DataError as e:
            errors.append(e)
    if errors:
        e = errors[0]
        raise DataError(e.file, e.line, e.field, e.problem, more=len(errors) - 1)
    return out


class _Tokenizing:
    """Shared prompt/response tokenization (chat template aware, see :mod:`lazarus.data.chat`):
    a response's tokens are the template's assistant turn, ending with exactly one end token."""

    def __init__(self, tokenizer, max_length, use_chat_template, system_prompt):
        self.tokenizer = tokenizer
        self.max_length = max_length
        has_template = has_chat_template(tokenizer)
        self.use_chat_template = has_template if use_chat_template is None else bool(use_chat_template)
        if self.use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.system_prompt = system_prompt
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos_token_id; every response must end with EOS")
        #: the tokens a complete response ends with (EOS ids and the template's end-of-turn token)
        self.end_ids = stop_ids(tokenizer) if self.use_chat_template else {self.eos_id}
        # Without a pad token EOS pads; padding is never in the loss mask (collate), whatever its id.
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else self.eos_id

    def _cut(self, text: str) -> str:
        """``text`` cut to what can possibly fit in ``max_length`` tokens (see CHARS_PER_TOKEN_BOUND)."""
        limit = self.max_length * CHARS_PER_TOKEN_BOUND if self.max_length else None
        return text if limit is None or len(text) <= limit else text[:limit]

    def _messages(self, prompt: str | list[dict]) -> list[dict]:
        """The prompt as chat messages (texts cut, the system prompt first); sets ``_prompt_cut``."""
        if isinstance(prompt, list):  # chat messages
            msgs = [dict(m, content=self._cut(m["content"])) for m in prompt]
            self._prompt_cut = any(m["content"] != c["content"] for m, c in zip(prompt, msgs))
        else:
            msgs = [{"role": "user", "content": self._cut(prompt)}]
            self._prompt_cut = len(msgs[0]["content"]) < len(prompt)
        if self.system_prompt and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        return msgs

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        return prompt_ids(self.tokenizer, self._messages(prompt), self.use_chat_template)

    def encode_response(self, response: str, prompt: str | list[dict] = "") -> list[int]:
        """The reply to ``prompt``: through the template's assistant turn, ending with one end token
        (see :func:`lazarus.data.chat.reply_ids`). A response cut before tokenizing gets no end
        token: it did not end there."""
        cut = self._cut(response)
        msgs = self._messages(prompt) if self.use_chat_template else []
        return reply_ids(self.tokenizer, msgs, cut, self.use_chat_template, ended=len(cut) == len(response))

    def _ended(self, ids: list[int]) -> bool:
        return bool(ids) and ids[-1] in self.end_ids

    def fingerprint(self) -> str:
        """SHA-256 of the tokenized examples (line numbers aside): resuming on other data of the
        same size is detected with it. Computed once."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256()
            for e in self.examples:
                for f in fields(e):
                    if f.name == "line":
                        continue
                    v = getattr(e, f.name)
                    if isinstance(v, list) and (not v or isinstance(v[0], int)):
                        h.update(b"L%d:" % len(v) + np.asarray(v, dtype=np.int64).tobytes())
                    else:
                        h.update(json.dumps(v, sort_keys=True, default=str).encode() + b"\x00")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    _limit_source = ""
    _prompt_cut = False  # the last encode_prompt cut its text (the token count is then a lower bound)

    def _too_long(self, n, field, prompt_len: int):
        size = f"more than {prompt_len}" if self._prompt_cut else f"{prompt_len}"
        return DataError(self.path, n, field, f"prompt alone is {size} tokens, which reaches "
                                              f"max_length={self.max_length}{self._limit_source}")

    def limit_length(self, max_length: int, why: str = "") -> None:
        """Apply ``max_length`` to a dataset built without one (the trainer passes the model's
        context): the same rules as at construction, on the tokenized examples. ``why`` is
        added to messages (e.g. " (the model's context)")."""
        if self.max_length is not None:
            return
        self.max_length, self._limit_source = max_length, why
        before = (getattr(self, "num_truncated", 0), getattr(self, "num_dropped", 0))
        self.examples = [e for e in _validate_all(self.path, [(e.line, e) for e in self.examples], self._refit)
                         if e is not None]
        self._fingerprint = None
        after = (getattr(self, "num_truncated", 0), getattr(self, "num_dropped", 0))
        if after != before:
            warnings.warn(f"{self.path}: {after[0] - before[0]} examples truncated and {after[1] - before[1]} "
                          f"dropped to max_length={max_length}{why}", stacklevel=2)
        if not self.examples:
            raise DataError(self.path, None, None, f"no usable examples after applying max_length={max_length}")


@dataclass
class SFTExample:
    ids: list[int]
    prompt_len: int
    line: int | None = None  # 1-based line in the source file, for messages


class SFTDataset(_Tokenizing):
    """Supervised pairs: ``{"prompt", "response"}`` or ``{"messages": [...]}`` per line.

    Prompts go through the tokenizer's chat template when it has one
    (``use_chat_template=False`` turns this off); each response is the template's assistant turn
    and ends with one end token (the template's end of turn, or EOS). Examples
    longer than ``max_length`` are truncated (``truncation="truncate"``, counted and warned)
    or dropped (``"drop"``); a prompt that alone reaches ``max_length`` is an error. Trainers
    apply the model's context (``max_position_embeddings``) when ``max_length`` is None, so no
    input line can make a batch too long for the model (see :meth:`limit_length`).
    """

    def __init__(self, path, tokenizer, *, max_length: int | None = None, mask_prompt: bool = True,
                 use_chat_template: bool | None = None, system_prompt: str | None = None,
                 truncation: str = "truncate"):
        super().__init__(tokenizer, max_length, use_chat_template, system_prompt)
        if truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
        self.path = Path(path)
        self.mask_prompt = mask_prompt
        self.truncation = truncation
        self.num_truncated = 0
        self.num_dropped = 0
        records = read_jsonl(self.path)
        examples = _validate_all(self.path, records, self._encode_record)
        self.examples: list[SFTExample] = [e for e in examples if e is not None]
        if self.num_truncated or self.num_dropped:
            warnings.warn(f"{self.path}: {self.num_truncated} examples truncated and {self.num_dropped} dropped "
                          f"to max_length={max_length}", stacklevel=2)
        if not self.examples:
            raise DataError(self.path, None, None, "no usable examples after applying max_length")

    def _encode_record(self, n, rec) -> SFTExample | None:
        if "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise DataError(self.path, n, "messages", "must be a non-empty list of {role, content}")
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise DataError(self.path, n, f"messages[{i}]", "must be an object with string 'role' and 'content'")
            if msgs[-1]["role"] != "assistant":
                raise DataError(self.path, n, "messages", "the last message must have role 'assistant'")
            if not msgs[-1]["content"].strip():
                raise DataError(self.path, n, f"messages[{len(msgs) - 1}].content", "is empty")
            prompt: Any = msgs[:-1]
            response = msgs[-1]["content"]
            prompt_field = "messages"
        else:
            prompt = _require_str(self.path, n, rec, "prompt")
            response = _require_str(self.path, n, rec, "response")
            prompt_field = "prompt"
        return self._fit(n, prompt_field, self.encode_prompt(prompt), self.encode_response(response, prompt))

    def _fit(self, n, field, p, r) -> SFTExample | None:
        if self.max_length is not None:
            if len(p) >= self.max_length:
                raise self._too_long(n, field, len(p))
            if len(p) + len(r) > self.max_length or (r and not self._ended(r)):
                if self.truncation == "drop":
                    self.num_dropped += 1
                    return None
                self.num_truncated += 1
                r = r[: self.max_length - len(p)]
        return SFTExample(p + r, len(p), n)

    def _refit(self, n, e: SFTExample) -> SFTExample | None:
        return self._fit(n, None, e.ids[: e.prompt_len], e.ids[e.prompt_len:])

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> np.ndarray:
        return np.array([len(e.ids) for e in self.examples])

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
            start = r.prompt_len - 1 if self.mask_prompt else 0
            mask[b, start:n] = 1.0
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
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` per line (DPO)."""

    def __init__(self, path, tokenizer, *, max_length: int | None = None, use_chat_template: bool | None = None,
                 system_prompt: str | None = None, truncation: str = "truncate"):
        super().__init__(tokenizer, max_length, use_chat_template, system_prompt)
        if truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
        self.path = Path(path)
        self.truncation = truncation
        self.num_truncated = 0
        self.num_dropped = 0
        records = read_jsonl(self.path)
        self.examples = [e for e in _validate_all(self.path, records, self._encode_record) if e is not None]
        if self.num_truncated or self.num_dropped:
            warnings.warn(f"{self.path}: {self.num_truncated} pairs truncated and {self.num_dropped} dropped "
                          f"to max_length={max_length}", stacklevel=2)
        if not self.examples:
            raise DataError(self.path, None, None, "no usable pairs after applying max_length")

    def _encode_record(self, n, rec):
        prompt = _require_str(self.path, n, rec, "prompt")
        chosen = _require_str(self.path, n, rec, "chosen")
        rejected = _require_str(self.path, n, rec, "rejected")
        return self._fit(n, "prompt", self.encode_prompt(prompt), self.encode_response(chosen, prompt),
                         self.encode_response(rejected, prompt))

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
    prompt: str
    ids: list[int]
    columns: dict
    line: int | None = None


class PromptDataset(_Tokenizing):
    """Prompts for online RL: ``{"prompt": ..., <any other columns>}`` per line. The other
    columns (e.g. ``answer``) are passed to reward functions as keyword lists."""

    def __init__(self, path, tokenizer, *, max_length: int | None = None, use_chat_template: bool | None = None,
                 system_prompt: str | None = None):
        super().__init__(tokenizer, max_length, use_chat_template, system_prompt)
        self.path = Path(path)
        records = read_jsonl(self.path)
        self.examples: list[PromptExample] = _validate_all(self.path, records, self._encode_record)
        cols = [set(e.columns) for e in self.examples]
        self.column_names = sorted(set.intersection(*cols)) if cols else []

    def _encode_record(self, n, rec):
        prompt = _require_str(self.path, n, rec, "prompt")
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
