"""Prompt token ids, through the tokenizer's chat template when it has one: one implementation for
the datasets (training) and for generation (``lazarus generate``, the demo's greedy answers)."""

from __future__ import annotations


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, messages: list[dict], use_chat_template: bool) -> list[int]:
    """Token ids of ``messages`` ({"role", "content"}) ready for the reply: rendered by the chat
    template with the generation prompt, or else their contents joined by newlines (with the
    tokenizer's special tokens, e.g. BOS)."""
    if use_chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode("\n".join(m["content"] for m in messages), add_special_tokens=True))


def chat_prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as a user turn, after the ``system`` message when given, through the
    chat template when there is one (without one: the prompt text alone)."""
    use_template = has_chat_template(tokenizer)
    system_turn = [{"role": "system", "content": system}] if system and use_template else []
    return prompt_ids(tokenizer, system_turn + [{"role": "user", "content": prompt}], use_template)
