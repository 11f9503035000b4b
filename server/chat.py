"""OpenAI chat messages -> the dicts a chat template sees (`LLM.apply_chat_template` renders them)."""
from __future__ import annotations


def request_messages(messages: list) -> list:
    """Role, content as one string (text parts joined by newlines; the only kind accepted) and, if given, name.
    A null content stays null: the template sees the key missing, as with transformers."""
    out = []
    for m in messages:
        msg = {"role": m.role, "content": _message_text(m.content)}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _message_text(content):
    if content is None or isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)
