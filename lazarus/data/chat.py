"""Token ids through the tokenizer's chat template: one implementation for the datasets (training)
and for generation (``lazarus generate``, the demo's greedy answers, online RL).

Published templates differ in what they do around a reply, and training must follow them:

* Some insert a default system turn when the conversation has none (Qwen2.5): the prompt is what
  the template renders, so the model trains on the prompt it will see at inference.
* Many end an assistant turn with a token of their own (``<|im_end|>``, Llama-3's ``<|eot_id|>``,
  Gemma's ``<end_of_turn>``), which may or may not be the tokenizer's ``eos_token``, and may
  put more after it (a newline). A reply's tokens are therefore taken from the template: the whole
  conversation, reply included, is rendered, and when the prompt (with its generation prompt)
  renders as a prefix of it, the reply is what follows, cut just after the first end token
  (:func:`stop_ids`): exactly one end token, nothing after it, never an end-of-turn plus an
  appended EOS. Otherwise (a template that renders the last turn differently, or fails) the reply
  is its text tokenized plus the template's end-of-turn token (:func:`end_of_turn_id`), or EOS.
* A conversation with several assistant turns (:func:`conversation_ids`) is rendered prefix by
  prefix on the same principle: each assistant turn's tokens are what the template puts after the
  conversation before it (with the generation prompt), cut after the end token.
* Generation stops at any of :func:`stop_ids`: the EOS ids (mlx-lm's ``eos_token_ids``, which
  include ``generation_config.json``'s list) and the template's end-of-turn token.
"""

from __future__ import annotations

import weakref

#: The reply used to find a template's end-of-turn token: plain text no template changes.
_PROBE = "Lazarus probe reply 7"
_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                         **extra)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def prompt_ids(tokenizer, messages: list[dict], use_chat_template: bool, tools: list | None = None) -> list[int]:
    """Token ids of ``messages`` ({"role", "content"}) ready for the reply: rendered by the chat
    template with the generation prompt (and whatever the template adds, e.g. a default system
    turn), or else their contents joined by newlines (with the tokenizer's special tokens, e.g. BOS)."""
    if use_chat_template:
        return _encode(tokenizer, _render(tokenizer, messages, True, tools))
    return list(tokenizer.encode("\n".join(m.get("content") or "" for m in messages), add_special_tokens=True))


def _special_ids(tokenizer) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or []}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, t in added.items() if getattr(t, "special", False))
    return ids


def _find_end_of_turn(tokenizer) -> int | None:
    try:
        text = _render(tokenizer, [{"role": "user", "content": "Hello"},
                                   {"role": "assistant", "content": _PROBE}], False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no end token we can find
        return None
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    special = _special_ids(tokenizer)
    return next((i for i in _encode(tokenizer, text[at + len(_PROBE):]) if i in special), None)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant reply (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, or the EOS itself), or None (no template, or none there).
    Found once per tokenizer by rendering a short conversation."""
    if not has_chat_template(tokenizer):
        return None
    template = tokenizer.chat_template
    try:
        cached = _END_OF_TURN.get(tokenizer)
    except TypeError:  # not weak-referenceable: found again every time
        cached = None
    if cached is not None and cached[0] == template:
        return cached[1]
    found = _find_end_of_turn(tokenizer)
    try:
        _END_OF_TURN[tokenizer] = (template, found)
    except TypeError:
        pass
    return found


def stop_ids(tokenizer) -> set[int]:
    """The tokens that end a reply: the tokenizer's EOS ids (mlx-lm's ``eos_token_ids``, which hold
    ``generation_config.json``'s list, plus ``eos_token_id``) and the template's end-of-turn token.
    Empty when the tokenizer has none of them."""
    ids = {int(i) for i in getattr(tokenizer, "eos_token_ids", None) or []}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    end = end_of_turn_id(tokenizer)
    if end is not None:
        ids.add(end)
    return ids


def _first_stop(tokenizer, ids: list[int]) -> int | None:
    stops = stop_ids(tokenizer)
    return next((k for k, t in enumerate(ids) if t in stops), None)


def reply_ids(tokenizer, messages: list[dict], reply: str, use_chat_template: bool, *,
              ended: bool = True, tools: list | None = None) -> list[int]:
    """Token ids of the assistant's ``reply`` to ``messages``, to follow :func:`prompt_ids`.

    With the template: the conversation with the reply rendered in full; when the prompt renders
    as its prefix, the reply is what follows, up to and including the first end token
    (:func:`stop_ids`); nothing the template puts after it is kept. Otherwise the reply's text
    tokenized plus the template's end-of-turn token (or EOS). ``ended=False`` (a reply cut short)
    leaves the end token out."""
    end = end_of_turn_id(tokenizer) if use_chat_template else None
    end = tokenizer.eos_token_id if end is None else end
    if use_chat_template:
        try:
            prompt = _render(tokenizer, messages, True, tools)
            full = _render(tokenizer, list(messages) + [{"role": "assistant", "content": reply}], False, tools)
        except Exception:  # noqa: BLE001 - e.g. a template that refuses a trailing assistant turn
            full = prompt = None
        if full is not None and full.startswith(prompt) and len(full) > len(prompt):
            tail = _encode(tokenizer, full[len(prompt):])
            at = _first_stop(tokenizer, tail)
            if at is not None:
                return tail[: at + 1] if ended else tail[:at]
            return tail + [end] if ended else tail
    ids = _encode(tokenizer, reply)
    return ids + [end] if ended else ids


def chat_prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as a user turn, after the ``system`` message when given, through the
    chat template when there is one (without one: the prompt text alone)."""
    use_template = has_chat_template(tokenizer)
    system_turn = [{"role": "system", "content": system}] if system and use_template else []
    return prompt_ids(tokenizer, system_turn + [{"role": "user", "content": prompt}], use_template)


def conversation_ids(tokenizer, messages: list[dict], tools: list | None = None
                     ) -> tuple[list[int], list[tuple[int, int]]] | None:
    """Token ids of a whole conversation (ending with an assistant turn) and the ``(start, end)`` spans
    of its assistant turns' reply tokens, or None when the template does not render its prefixes
    consistently (the caller falls back).

    Each assistant turn is :func:`reply_ids`'s principle applied in place: the rendering up to and
    including the turn, minus the rendering up to the turn before it with the generation prompt,
    cut after the first end token (:func:`stop_ids`); what the template writes after that token (a
    newline) and the next turns' text up to the next generation prompt are untrained tokens. The
    ids are the tokens of those consecutive pieces of text, so one assistant turn gives exactly
    ``prompt_ids + reply_ids``. Consistent means: each such rendering starts with the previous one
    (a template that drops earlier turns' reasoning, or whose generation prompt the rendered reply
    does not start with, is not)."""
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    end = end_of_turn_id(tokenizer)
    end = tokenizer.eos_token_id if end is None else end
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    text = ""
    for k in range(last + 1):
        if messages[k]["role"] != "assistant":
            continue
        try:
            prompt = _render(tokenizer, messages[:k], True, tools)
            full = _render(tokenizer, messages[: k + 1], False, tools)
        except Exception:  # noqa: BLE001 - e.g. a template that refuses a conversation starting this way
            return None
        if not (prompt.startswith(text) and full.startswith(prompt) and len(full) > len(prompt)):
            return None
        ids += _encode(tokenizer, prompt[len(text):])
        tail = _encode(tokenizer, full[len(prompt):])
        at = _first_stop(tokenizer, tail)
        reply = tail if at is None else tail[: at + 1]
        if k == last and at is None:
            reply = reply + [end]
        spans.append((len(ids), len(ids) + len(reply)))
        ids += reply if k == last else tail
        text = full
    return ids, spans
