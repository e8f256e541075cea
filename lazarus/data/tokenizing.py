"""Tokenization shared by the datasets: prompts and replies through the chat template (see
:mod:`lazarus.data.chat`), reading any source, validation of every record, ``max_length`` rules and the
resume fingerprint."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import fields

import numpy as np

from lazarus.data.chat import conversation_ids, has_chat_template, prompt_ids, reply_ids, stop_ids
from lazarus.data.sources import DataError, collect_errors, load_records

#: A text longer than ``max_length * CHARS_PER_TOKEN_BOUND`` characters is cut to that many before
#: tokenizing: it cannot fit anyway, and tokenizing a multi-megabyte line would take seconds.
CHARS_PER_TOKEN_BOUND = 64


def _validate_all(path, records, fn):
    """Run ``fn(n, rec)`` on every record; collect errors so the report counts them all."""
    out, errors = [], []
    for n, rec in records:
        try:
            out.append(fn(n, rec))
        except DataError as e:
            errors.append(e)
    collect_errors(errors)
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

    def _build(self, data, truncation: str, noun: str) -> None:
        """Read ``data`` (any source), encode every record (``_encode_record``), apply ``truncation``."""
        if truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
        self.truncation = truncation
        self.num_truncated = 0
        self.num_dropped = 0
        self.path, records = load_records(data)
        self.examples = [e for e in _validate_all(self.path, records, self._encode_record) if e is not None]
        if self.num_truncated or self.num_dropped:
            warnings.warn(f"{self.path}: {self.num_truncated} {noun} truncated and {self.num_dropped} dropped "
                          f"to max_length={self.max_length}", stacklevel=3)
        if not self.examples:
            raise DataError(self.path, None, None, f"no usable {noun} after applying max_length")

    def _cut(self, text: str) -> str:
        """``text`` cut to what can possibly fit in ``max_length`` tokens (see CHARS_PER_TOKEN_BOUND)."""
        limit = self.max_length * CHARS_PER_TOKEN_BOUND if self.max_length else None
        return text if limit is None or len(text) <= limit else text[:limit]

    def _messages(self, prompt: str | list[dict]) -> list[dict]:
        """The prompt as chat messages (texts cut, the system prompt first); sets ``_prompt_cut``."""
        if isinstance(prompt, list):  # chat messages
            msgs = self._cut_all(prompt)
            self._prompt_cut = any(m.get("content") != c.get("content") for m, c in zip(prompt, msgs))
        else:
            msgs = [{"role": "user", "content": self._cut(prompt)}]
            self._prompt_cut = len(msgs[0]["content"]) < len(prompt)
        if self.system_prompt and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        return msgs

    def _cut_all(self, msgs: list[dict]) -> list[dict]:
        """Messages with their texts cut (an assistant turn calling tools may have no text)."""
        return [dict(m, content=self._cut(m["content"])) if isinstance(m.get("content"), str) else m for m in msgs]

    def encode_prompt(self, prompt: str | list[dict], tools: list | None = None) -> list[int]:
        return prompt_ids(self.tokenizer, self._messages(prompt), self.use_chat_template, tools)

    def encode_response(self, response: str, prompt: str | list[dict] = "", tools: list | None = None) -> list[int]:
        """The reply to ``prompt``: through the template's assistant turn, ending with one end token
        (see :func:`lazarus.data.chat.reply_ids`). A response cut before tokenizing gets no end
        token: it did not end there."""
        cut = self._cut(response)
        msgs = self._messages(prompt) if self.use_chat_template else []
        return reply_ids(self.tokenizer, msgs, cut, self.use_chat_template, ended=len(cut) == len(response),
                         tools=tools)

    def encode_pair(self, n, field: str, prompt, reply) -> tuple[list[int], list[int]]:
        """``(prompt ids, reply ids)``: a text reply, or reply messages (a lone assistant message is
        its text; several messages: every token the template renders after the prompt)."""
        if isinstance(reply, list) and len(reply) == 1 and set(reply[0]) <= {"role", "content"}:
            reply = reply[0]["content"]
        if isinstance(reply, str):
            return self.encode_prompt(prompt), self.encode_response(reply, prompt)
        msgs = self._messages(prompt)
        first = sum(m["role"] == "assistant" for m in msgs)  # the index of the reply's first turn in the spans
        got = conversation_ids(self.tokenizer, msgs + self._cut_all(reply)) if self.use_chat_template else None
        if got is None:
            why = "the chat template does not render it prefix by prefix" if self.use_chat_template else \
                "there is no chat template"
            raise DataError(self.path, n, field, f"a reply of several messages cannot be tokenized: {why}")
        ids, spans = got
        return ids[: spans[first][0]], ids[spans[first][0]:]

    @property
    def format(self) -> str | None:
        """The rows' format (:mod:`lazarus.data.formats`): the one given, else the one detected."""
        return self.row_format.name

    def _ended(self, ids: list[int]) -> bool:
        return bool(ids) and ids[-1] in self.end_ids

    def fingerprint(self) -> str:
        """SHA-256 of the tokenized examples (line numbers aside, and optional fields that are unset):
        resuming on other data of the same size is detected with it. Computed once."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256()
            for e in self.examples:
                for f in fields(e):
                    v = getattr(e, f.name)
                    if f.name == "line" or (v is None and f.kw_only):
                        continue
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
