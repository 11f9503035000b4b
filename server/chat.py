"""Chat messages -> prompt token ids.

Prompts are rendered with the tokenizer's chat template (jinja2, in a sandbox,
as transformers does) when the model has one. Otherwise with the plain
template below, encoded with BOS:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n
"""
from __future__ import annotations

import functools
import json
import time
from typing import Optional

from .errors import ApiError


def request_messages(messages: list) -> list:
    """The request's chat messages as the dicts a template sees: role, text content and, if given, name."""
    out = []
    for m in messages:
        msg = {"role": m.role, "content": _message_text(m.content)}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _message_text(content) -> str:
    """A message's content as one string: text parts (the only kind accepted) joined by newlines."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


def render_chat(tokenizer, messages: list) -> list:
    """Chat messages (dicts with role and content) -> prompt token ids, ending where the assistant speaks."""
    source = _template_source(tokenizer)
    try:
        import jinja2
    except ImportError:  # documented: without jinja2 every model gets the plain template
        jinja2 = None
    if source is None or jinja2 is None:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
        return tokenizer.encode(text)
    try:
        template = _compile_template(source)
    except jinja2.TemplateError as e:
        raise ApiError(500, f"the model's chat template is invalid: {e}") from None
    eos = getattr(tokenizer, "eos_ids", ()) or ()
    try:
        text = template.render(messages=messages, add_generation_prompt=True,
                               bos_token=_special_token(tokenizer, tokenizer.bos_id),
                               eos_token=_special_token(tokenizer, eos[0] if eos else None))
    except jinja2.TemplateError as e:
        raise ApiError(400, f"the chat template failed on these messages: {e}", param="messages") from None
    ids = tokenizer.encode(text, add_bos=False)
    if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids  # Llama expects BOS even where a template leaves it out
    return ids


def _template_source(tokenizer) -> Optional[str]:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, list):  # [{"name", "template"}, ...] as in some tokenizer_config.json files
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    """The template in a sandbox with transformers' globals (raise_exception, strftime_now, loop controls)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ApiError(400, f"chat template: {message}", param="messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def _special_token(tokenizer, token_id: Optional[int]) -> str:
    """The text of a special token (for `bos_token`/`eos_token`); '' where the tokenizer has no vocabulary."""
    if token_id is None:
        return ""
    tok = getattr(tokenizer, "tok", None)
    if tok is not None and hasattr(tok, "id_to_token"):
        return tok.id_to_token(token_id) or ""
    return ""
