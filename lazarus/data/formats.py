"""Row formats: which fields a row has and what they mean (TRL's and mlx-lm's names are accepted).

A dataset's format is the ``format`` it is given, else the one of its first recognisable row
(the first format, in the order below, whose fields the row has); every row is then read in that
format, so a row that lacks a field is an error naming the field, the format and the fields the row
has. A first row of no known format is one line naming its fields and the field sets accepted.

=================  ===============================  =========================================
dataset            format: fields                   meaning
=================  ===============================  =========================================
SFTDataset         messages: messages [, tools]     a conversation; every assistant turn trained
                   prompt_response: prompt,         a prompt (text or messages) and its reply
                   response
                   prompt_completion: prompt,       the same under TRL's and mlx-lm's names
                   completion
                   text: text                       plain text, every token trained
PreferenceDataset  preference: prompt, chosen,      a prompt and two replies (text or messages)
                   rejected
                   implicit_preference: chosen,     two whole conversations (or texts): their
                   rejected                         shared start is the prompt
PromptDataset      prompt: prompt                   text or messages; other columns go to rewards
=================  ===============================  =========================================
"""

from __future__ import annotations

from lazarus.data.sources import DataError

SFT_FORMATS = {"messages": ("messages",), "prompt_response": ("prompt", "response"),
               "prompt_completion": ("prompt", "completion"), "text": ("text",)}
PREFERENCE_FORMATS = {"preference": ("prompt", "chosen", "rejected"), "implicit_preference": ("chosen", "rejected")}
PROMPT_FORMATS = {"prompt": ("prompt",)}
#: other names a ``format`` may be given by (mlx-lm's dataset kinds)
ALIASES = {"chat": "messages", "completions": "prompt_completion"}
MESSAGE = "{role, content}"


def check_format(name: str | None, formats: dict, dataset: str) -> str | None:
    """``name`` (or its alias) when it is one of ``formats``; None stays None (detect)."""
    if name is None:
        return None
    canonical = ALIASES.get(name, name)
    if canonical not in formats:
        raise ValueError(f"format {name!r} is not a {dataset} format; expected one of: {', '.join(formats)}")
    return canonical


def _fields(rec: dict) -> str:
    """The fields a row has (a null value, as tables give a row without that column, is no field)."""
    return ", ".join(str(k) for k, v in rec.items() if v is not None) or "none"


class RowFormat:
    """The format of a dataset's rows: ``given``, else the first recognisable row's."""

    def __init__(self, formats: dict, given: str | None, dataset: str):
        self.formats, self.dataset = formats, dataset
        self.name = check_format(given, formats, dataset)
        self.given = self.name is not None

    def accepted(self) -> str:
        return " | ".join("{" + ", ".join(f) + "}" for f in self.formats.values())

    def of(self, where, n, rec: dict) -> str:
        """The format row ``n`` is read in (the first recognisable row sets the dataset's)."""
        if self.name is None:
            found = next((name for name, fields in self.formats.items()
                          if all(rec.get(f) is not None for f in fields)), None)
            if found is None:
                raise DataError(where, n, None, f"unrecognised {self.dataset} row: fields found: {_fields(rec)}; "
                                                f"accepted: {self.accepted()}")
            self.name = found
        for f in self.formats[self.name]:
            if rec.get(f) is None:
                how = "given" if self.given else "detected from the first row"
                raise DataError(where, n, f, f"missing (format {self.name}, {how}: fields "
                                             f"{', '.join(self.formats[self.name])}; this row has: {_fields(rec)})")
        return self.name


def text_value(where, n, rec: dict, field: str) -> str:
    """A non-empty string field."""
    if rec.get(field) is None:
        raise DataError(where, n, field, "missing")
    v = rec[field]
    if not isinstance(v, str):
        raise DataError(where, n, field, f"must be a string, got {type(v).__name__}")
    if not v.strip():
        raise DataError(where, n, field, "is empty")
    return v


def messages_value(where, n, field: str, value) -> list[dict]:
    """A non-empty list of chat messages: string ``role``; string ``content`` (an assistant message
    calling tools may have none)."""
    if not isinstance(value, list) or not value:
        raise DataError(where, n, field, f"must be a non-empty list of {MESSAGE}")
    for i, m in enumerate(value):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str)
        content = m.get("content") if ok else None
        if not ok or not (isinstance(content, str) or (content is None and m.get("tool_calls"))):
            raise DataError(where, n, f"{field}[{i}]", "must be an object with string 'role' and 'content'")
    return value


def turns_value(where, n, rec: dict, field: str) -> str | list[dict]:
    """A field holding text or chat messages (TRL's standard and conversational forms)."""
    if field in rec and isinstance(rec[field], list):
        return messages_value(where, n, field, rec[field])
    if field in rec and not isinstance(rec[field], str):
        raise DataError(where, n, field, f"must be a string, got {type(rec[field]).__name__} (or a list of "
                                         f"{MESSAGE} messages)")
    return text_value(where, n, rec, field)


def reply_value(where, n, rec: dict, field: str, prompt) -> str | list[dict]:
    """A reply field (``response``, ``completion``, ``chosen``, ``rejected``): text, or messages that
    start and end with an assistant turn (a copy of ``prompt``'s messages in front is dropped)."""
    value = turns_value(where, n, rec, field)
    if isinstance(value, str):
        return value
    if isinstance(prompt, list) and len(value) > len(prompt) and value[: len(prompt)] == prompt:
        value = value[len(prompt):]
    check_reply(where, n, field, value)
    return value


def check_reply(where, n, field: str, msgs: list[dict]) -> None:
    if msgs[0]["role"] != "assistant":
        raise DataError(where, n, f"{field}[0]", f"must have role 'assistant' (a reply), got '{msgs[0]['role']}'")
    _check_ends_with_reply(where, n, field, msgs)


def _check_ends_with_reply(where, n, field: str, msgs: list[dict]) -> None:
    if msgs[-1]["role"] != "assistant":
        raise DataError(where, n, field, "the last message must have role 'assistant'")
    last = msgs[-1].get("content")
    if not (last or "").strip() and not msgs[-1].get("tool_calls"):
        raise DataError(where, n, f"{field}[{len(msgs) - 1}].content", "is empty")


def conversation_value(where, n, rec: dict) -> tuple[list[dict], list | None]:
    """A ``messages`` row: the conversation (ending with an assistant turn) and its ``tools``."""
    msgs = messages_value(where, n, "messages", rec.get("messages"))
    _check_ends_with_reply(where, n, "messages", msgs)
    tools = rec.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(where, n, "tools", f"must be a list of tool definitions, got {type(tools).__name__}")
    return msgs, tools


def implicit_prompt(where, n, chosen, rejected) -> tuple:
    """TRL's implicit prompt: ``(prompt, chosen, rejected)`` with the prompt the start ``chosen`` and
    ``rejected`` share (whole messages; for texts, whole words)."""
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(where, n, "rejected", "must be of the same kind as 'chosen' (both texts or both message lists)")
    k = 0  # the length of the shared start (messages, or characters)
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if isinstance(chosen, list):
        prompt, c, r = chosen[:k], chosen[k:], rejected[k:]
    else:
        while k > 0 and not chosen[k - 1].isspace():  # back to the start of the word they differ in
            k -= 1
        prompt, c, r = chosen[:k].rstrip(), chosen[k:], rejected[k:]
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise DataError(where, n, "chosen", "shares no prompt with 'rejected' (format implicit_preference: the "
                                            "shared start of the two is the prompt)")
    if not c or not r or c == r:
        raise DataError(where, n, "rejected", "must differ from 'chosen' after their shared prompt")
    if isinstance(c, list):
        check_reply(where, n, "chosen", c)
        check_reply(where, n, "rejected", r)
    return prompt, c, r


def format_options(config, dataset_class) -> dict:
    """The data options a trainer config sets (``format``, ``assistant_only``) that ``dataset_class``
    takes: what a trainer passes when it builds its dataset from a path, a list or a ``datasets.Dataset``."""
    import inspect

    params = inspect.signature(dataset_class).parameters
    return {k: getattr(config, k) for k in ("format", "assistant_only")
            if k in params and getattr(config, k, None) is not None}
