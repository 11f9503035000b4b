"""Structured output: llguidance grammars, one matcher per constrained request, and a step's token masks.

A request that asks for JSON (`SamplingParams.json_schema` or `json_object`) gets an llguidance
`LLMatcher` when the engine adds it; a schema llguidance refuses is an `InvalidRequest` (HTTP 400)
raised before anything changes. The engine feeds the matcher every token the request generates and,
before the sampling program of a batch with constrained rows, asks for their masks (`masks`):
llguidance's bitmask, [B, ceil(V / 32)] int32, computed for the constrained rows only, in parallel
threads outside the GIL; the other rows keep every bit set. The sampler applies it on the device
(sampling.sample). A constrained request stops when its matcher does (the grammar is complete and
accepts nothing more) or when it samples EOS, which the mask allows only where the grammar accepts.

The worker that computes a step's masks needs the GIL for a few microseconds at its start and end (the
mask itself is computed outside it). Under CPython's default 5 ms switch interval it would get it only when
the engine thread next blocks, so masks would run after the host's own work instead of beside it; the first
grammar lowers the process's switch interval to `SWITCH_INTERVAL_S`, so the worker gets the GIL within that
much.

JSON comes out compact by default (llguidance's `whitespace_flexible` off: no whitespace between
tokens), so that a model cannot wander into whitespace without end; a schema's own `x-guidance` object
overrides llguidance's JSON options (e.g. `{"whitespace_flexible": true}`). Compiled grammars are
cached by their text (a few dozen), and each request gets a copy of the cached matcher.
"""
from __future__ import annotations

import collections
import json
import sys
import threading
from typing import Optional

import numpy as np

from ..errors import InvalidRequest

JSON_DEFAULTS = {"whitespace_flexible": False}
ANY_OBJECT = json.dumps({"type": "object"})
CACHED_GRAMMARS = 64
SWITCH_INTERVAL_S = 0.0005


def grammar_text(sampling) -> Optional[str]:
    """The llguidance grammar a request's SamplingParams ask for, or None (unconstrained)."""
    schema = sampling.json_schema if sampling.json_schema is not None else ANY_OBJECT if sampling.json_object else None
    if schema is None:
        return None
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
    except ValueError as e:
        raise InvalidRequest(f"the JSON schema is refused: {e}", "response_format") from None


class Grammars:
    """The grammars of one engine: its tokenizer as llguidance sees it (built on first use: about a second
    for a 32k vocabulary), compiled grammars, and the executor that computes masks in parallel."""

    def __init__(self, tokenizer, n_vocab: int):
        self.tokenizer, self.n_vocab = tokenizer, n_vocab
        self.words = (n_vocab + 31) // 32  # int32 words of one row's mask
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._executor = None
        self._compiled: collections.OrderedDict = collections.OrderedDict()  # grammar text -> LLMatcher

    def _ready(self) -> None:
        """Under the lock: build the llguidance tokenizer and executor once."""
        if self._ll_tokenizer is None:
            import llguidance

            self._ll_tokenizer = self.tokenizer.guidance_tokenizer(self.n_vocab)
            self._executor = llguidance.LLExecutor()
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))

    def matcher(self, sampling):
        """A fresh matcher for a request's SamplingParams, or None if it asks for no structure.
        Raises InvalidRequest (param "response_format") for a schema llguidance refuses."""
        grammar = grammar_text(sampling)
        if grammar is None:
            return None
        import llguidance

        with self._lock:
            self._ready()
            compiled = self._compiled.get(grammar)
            if compiled is None:
                compiled = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
                if compiled.is_error():
                    raise InvalidRequest(f"the JSON schema is refused: {compiled.get_error()}", "response_format")
                self._compiled[grammar] = compiled
                while len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(grammar)
            return compiled.deep_copy()

    def masks(self, rows: list, b: int) -> np.ndarray:
        """[b, words] int32: row i's allowed tokens for each (matcher, i) of `rows`, every bit set elsewhere."""
        from llguidance.numpy import fill_next_token_bitmask_par

        out = np.full((b, self.words), -1, np.int32)
        if rows:
            fill_next_token_bitmask_par(self._executor, rows, out)
        return out


def advance(matcher, token: int) -> Optional[str]:
    """Feed one generated token: None to go on, "stop" once the grammar is complete, "error" if it refused
    the token (a token the mask did not allow)."""
    if not matcher.consume_token(token):
        return "error"
    return "stop" if matcher.is_stopped() else None
