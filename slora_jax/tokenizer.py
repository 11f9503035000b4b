"""Tokenizers, chat templates and incremental detokenization, as HF serves a model dir.

`HFTokenizer` reads `tokenizer.json` (HF `tokenizers`) and the dir's chat template; `ByteTokenizer`
is the tiny default model's: byte b is id b, ids 256.. are special (bos = 256, eos = 257 in
configs/tiny.json), and its chat format is the plain one below unless a template is given.

Chat templates are found where transformers looks: `chat_template.jinja` (what `save_pretrained`
writes now), else `chat_template` in `tokenizer_config.json` (a string, or a list of named templates
of which "default" is used), else `chat_template.json`; `chat_template=` (the CLI's
`--chat-template FILE`) overrides them. They render as `apply_chat_template` renders them: jinja2 in
an immutable sandbox with trim_blocks and lstrip_blocks, transformers' globals (`raise_exception`,
`strftime_now`, `tojson` without HTML escaping, loop controls, the `{% generation %}` tag), the special
token strings of tokenizer_config.json (`bos_token`, `eos_token`, ...), and the text tokenized with
`add_special_tokens=False`. A model without a template refuses chat (`InvalidRequest`) rather than
guessing a format.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Optional, Sequence

from .errors import ConfigError, InvalidRequest

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# -- chat templates -------------------------------------------------------------------------------------
def plain_chat_text(messages: list) -> str:
    """The byte tokenizer's chat format: `<|role|>\\n{content}\\n` per message, then `<|assistant|>\\n`."""
    return "".join(f"<|{m['role']}|>\n{m.get('content') or ''}\n" for m in messages) + "<|assistant|>\n"


class ChatTemplate:
    """A jinja chat template, compiled once, rendered like transformers' `apply_chat_template`."""

    def __init__(self, source: str, special_tokens: Optional[dict] = None, origin: str = "chat template"):
        self.source, self.origin = source, origin
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = _compile(source)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise ConfigError(f"{origin} is not a valid jinja template: {e}") from None

    def render(self, messages: list, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text; `InvalidRequest` if the template refuses these messages (raise_exception)."""
        import jinja2

        # as transformers does: keys whose value is None are dropped (templates test for their presence)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except _TemplateRefusal as e:
            raise InvalidRequest(f"the chat template refused these messages: {e}", "messages") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise InvalidRequest(f"the chat template failed on these messages: {e}", "messages") from None


class _TemplateRefusal(Exception):
    """`raise_exception(...)` called by a template."""


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise _TemplateRefusal(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_chat_template(model_dir: str, tokenizer_config: dict) -> tuple[Optional[str], str]:
    """(template source or None, where it came from) in transformers' order of precedence."""
    jinja_file = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read(), jinja_file
    tpl, origin = tokenizer_config.get("chat_template"), os.path.join(model_dir, "tokenizer_config.json")
    if tpl is None and os.path.exists(os.path.join(model_dir, "chat_template.json")):
        origin = os.path.join(model_dir, "chat_template.json")
        tpl = _read_json(origin).get("chat_template")
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}]: the default one, as apply_chat_template uses
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        if "default" not in named:
            raise ConfigError(f"{origin}: named chat templates {sorted(map(str, named))} but none is 'default'")
        tpl = named["default"]
    if tpl is not None and not isinstance(tpl, str):
        raise ConfigError(f"{origin}: chat_template must be a string or a list of named templates")
    return (tpl, origin) if tpl else (None, "")


# -- tokenizers -------------------------------------------------------------------------------------------
class _NotAByte:
    """Every id but 0-255: the ids ByteTokenizer.decode skips, as a set."""

    def __contains__(self, i) -> bool:
        return not 0 <= i < 256


class ByteTokenizer:
    """Bytes as ids (the tiny default model). Its chat format is `plain_chat_text` encoded with BOS,
    unless a chat template is given. Every id past the bytes is special: decode skips it."""

    special_ids = _NotAByte()

    def __init__(self, bos_id: Optional[int] = 256, eos_ids: Sequence[int] = (257,), chat_template: Optional[str] = None):
        self.bos_id, self.eos_ids = bos_id, tuple(eos_ids)
        self.chat_template = chat_template
        self._template = ChatTemplate(chat_template, origin="--chat-template") if chat_template else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> list[int]:
        if self._template is not None:
            return self.encode(self._template.render(messages, add_generation_prompt), add_bos=False)
        return self.encode(plain_chat_text(messages))

    def guidance_tokenizer(self, n_vocab: int):
        """The llguidance tokenizer of these ids (structured output): bytes, then special tokens."""
        import llguidance

        class Vocab:  # what llguidance.TokenizerWrapper reads
            eos_token_id = self.eos_ids[0] if self.eos_ids else None
            bos_token_id = self.bos_id
            tokens = [bytes([i]) for i in range(256)] + [f"<|special_{i}|>".encode() for i in range(256, n_vocab)]
            special_token_ids = list(range(256, n_vocab))

            def __call__(self, text) -> list:
                return list(text if isinstance(text, bytes) else text.encode("utf-8"))

        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocab()), n_vocab=n_vocab,
                                      eos_token=list(self.eos_ids))


class HFTokenizer:
    """An HF model dir's tokenizer.json, special tokens and chat template. `eos_ids` (the model's, from
    config.json and generation_config.json) gain the tokenizer's own eos token."""

    def __init__(self, model_dir: str, bos_id: Optional[int], eos_ids: Sequence[int],
                 chat_template: Optional[str] = None):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.byte_fallback_ids, self.special_ids = _byte_fallback_ids(self.tok), _special_ids(self.tok)
        tc_path = os.path.join(model_dir, "tokenizer_config.json")
        tc = _read_json(tc_path) if os.path.exists(tc_path) else {}
        self.special_tokens = {k: _token_text(tc.get(k)) for k in SPECIAL_TOKEN_KEYS}
        if self.special_tokens["bos_token"] is None and bos_id is not None:
            self.special_tokens["bos_token"] = self.tok.id_to_token(bos_id)
        if self.special_tokens["eos_token"] is None and eos_ids:
            self.special_tokens["eos_token"] = self.tok.id_to_token(eos_ids[0])
        own_eos = self.tok.token_to_id(self.special_tokens["eos_token"] or "")
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys([*eos_ids, *([own_eos] if own_eos is not None else [])]))
        if chat_template is not None:
            origin = "--chat-template"
        else:
            chat_template, origin = find_chat_template(model_dir, tc)
        self.chat_template = chat_template
        self._template = ChatTemplate(chat_template, self.special_tokens, origin) if chat_template else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids of a chat, as transformers' `apply_chat_template(messages, tokenize=True)`."""
        if self._template is None:
            raise InvalidRequest("this model has no chat template (no chat_template.jinja, and none in "
                                 "tokenizer_config.json): use completions, or serve it with --chat-template FILE",
                                 "messages")
        return self.encode(self._template.render(messages, add_generation_prompt), add_bos=False)

    def guidance_tokenizer(self, n_vocab: int):
        """The llguidance tokenizer of this tokenizer.json (structured output); `n_vocab`: the model's rows
        (an id past the tokenizer's own vocabulary is never allowed)."""
        import llguidance

        return llguidance.LLTokenizer(self.tok.to_str(), n_vocab=n_vocab, eos_token=list(self.eos_ids))


def _byte_fallback_ids(tok) -> frozenset:
    """Ids of the `<0xXX>` tokens of a byte-fallback BPE (SentencePiece-style), else empty."""
    model = json.loads(tok.to_str()).get("model", {})
    if not model.get("byte_fallback"):
        return frozenset()
    return frozenset(i for t, i in tok.get_vocab(with_added_tokens=False).items()
                     if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))


def _special_ids(tok) -> frozenset:
    return frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)


def load_tokenizer(model_path: str, bos_id, eos_ids, chat_template: Optional[str] = None):
    """The tokenizer of a model dir (tokenizer.json) or preset (bytes); `chat_template`: a template's text."""
    if os.path.isdir(model_path) and os.path.exists(os.path.join(model_path, "tokenizer.json")):
        return HFTokenizer(model_path, bos_id, eos_ids, chat_template)
    return ByteTokenizer(bos_id, eos_ids, chat_template)


# -- incremental detokenization ---------------------------------------------------------------------------
class IncrementalDecoder:
    """Text deltas of a growing output that concatenate to decode(prompt + output) minus decode(prompt).

    Tokens do not decode independently: SentencePiece-style decoders (Metaspace, or Replace + a `Strip`
    of one leading space) drop the leading space of the first token they see, so `▁world` decodes to
    "world" alone and to " world" after `Hello`; byte-level and byte-fallback tokens may split one
    character. So each push decodes a window that starts a few tokens back (the prompt's last tokens at
    first) and emits only the text past the window's already-emitted part; text ending in U+FFFD (a
    character still incomplete) is held back until it completes, or until `flush()` at the end.

    Byte-fallback decoders turn a whole run of `<0xXX>` tokens into U+FFFDs if any byte of it is
    invalid, so a later byte can change the text of earlier ones: the text of a trailing run of byte
    tokens (special tokens, skipped in decoding, do not end a run) waits until a token ends the run.

    Special tokens never enter the window: decode skips them, so the text is the same without them, and
    a window that emits no text does not move on (a run of them would make every push decode it all
    again, which random-weight benchmarks, whose ids are mostly special to a byte tokenizer, did).
    """

    PROMPT_CONTEXT = 5  # prompt tokens decoded before the first generated one (as vLLM)

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = ()):
        self.tok = tokenizer
        byte_ids = getattr(tokenizer, "byte_fallback_ids", frozenset())
        self._special = getattr(tokenizer, "special_ids", frozenset())
        self._run_ids = byte_ids | self._special if byte_ids else frozenset()
        self.ids = list(prompt_ids[-self.PROMPT_CONTEXT:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)  # window start; end of the emitted part
        self._prefix_text = tokenizer.decode(self.ids)  # decode(ids[prefix_offset:read_offset])

    def push(self, new_ids: Sequence[int]) -> str:
        new = [i for i in new_ids if i not in self._special]
        if not new:
            return ""  # the window and its text are unchanged
        self.ids.extend(new)
        return self._advance(hold_incomplete=True)

    def flush(self) -> str:
        """The text held back: the output ended, an incomplete character shows as decode() shows it."""
        return self._advance(hold_incomplete=False)

    def _advance(self, hold_incomplete: bool) -> str:
        end = len(self.ids)
        if hold_incomplete:
            while end > self.read_offset and self.ids[end - 1] in self._run_ids:  # an open byte run
                end -= 1
        text = self.tok.decode(self.ids[self.prefix_offset:end])
        if len(text) <= len(self._prefix_text) or (hold_incomplete and text.endswith("\ufffd")):
            return ""
        delta = text[len(self._prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, end
        self._prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        return delta
