"""The preference instruction in text mode: where its text goes in a conversation, and the system message a chat
template adds by itself (which the instruction joins rather than replaces)."""

from __future__ import annotations

from .errors import UserInputError


def template_default_system(tokenizer) -> str:
    """The system text a chat template renders for a conversation that has none ("" if it adds none).

    Qwen2.5's template adds "You are Qwen, created by Alibaba Cloud. ..." when no system message is given.
    A guided prompt that brought its own system message would silently drop that text, and the two views
    would differ by more than the instruction; so the instruction is appended to this default instead.
    Only PREFERENCE_POSITION=system needs it: a template that refuses a system message (Gemma, Mistral v0.1)
    is a `UserInputError` that suggests PREFERENCE_POSITION=user.
    """
    from jinja2.exceptions import TemplateError

    sentinel = "\x1fSYSTEM\x1f"
    user = [{"role": "user", "content": "x"}]
    plain = tokenizer.apply_chat_template(user, tokenize=False)
    try:
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": sentinel}, *user], tokenize=False)
    except TemplateError as e:
        raise UserInputError(
            f"The tokenizer's chat template does not accept a system message ({str(e).strip() or 'TemplateError'}), so "
            "PREFERENCE_POSITION=system has nowhere to put the instruction; set PREFERENCE_POSITION=user (the "
            "instruction then opens the first user message)."
        ) from None
    if sentinel not in with_system:
        return ""
    head, tail = with_system.split(sentinel, 1)
    if plain.startswith(head) and plain.endswith(tail) and len(plain) > len(head) + len(tail):
        return plain[len(head) : len(plain) - len(tail)]
    return ""


def insert_instruction(
    prompt: str | list[dict[str, str]], text: str, position: str = "system", default_system: str = ""
):
    """The prompt with the instruction `text` in it (a new object; `prompt` is not modified).

    Plain strings: `text`, a blank line, the prompt. Conversations, `position="system"`: appended after a
    blank line to the first system message, or else to the chat template's `default_system` text in a new
    system message first; `position="user"`: before the first user message, followed by a blank line.
    """
    if isinstance(prompt, str):
        return f"{text}\n\n{prompt}"
    messages = [dict(m) for m in prompt]
    if position == "system":
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{text}"
        else:
            content = f"{default_system}\n\n{text}" if default_system else text
            messages.insert(0, {"role": "system", "content": content})
        return messages
    if position == "user":
        for message in messages:
            if message["role"] == "user":
                message["content"] = f"{text}\n\n{message['content']}"
                return messages
        raise UserInputError("A conversational prompt has no user message to put the instruction before.")
    raise ValueError(f"unknown instruction position {position!r}")
