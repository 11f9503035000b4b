"""Per-request state: one object holds everything about a request (nano-vllm's Sequence), and the one
check of what a request asks for (`SamplingParams` checks its own ranges; `check_request` the prompt
against the model's limits). The engine runs them on every request, and the server relies on them.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import time
from typing import NamedTuple, Optional, Sequence, Union

from ..errors import InvalidRequest, RequestError, RequestTooLong  # noqa: F401  (RequestError: their base)


MAX_LOGPROBS = 20  # sampling.MAX_LOGPROBS: most likely tokens per position a request may ask for


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to generate. `logprobs`: also return each generated token's log-probability and those of the
    `logprobs` most likely tokens at its position (0..20; None: no log-probabilities). `json_schema` (a
    JSON Schema, as a dict or its JSON text) or `json_object`: generate JSON that the schema (or any JSON
    object) admits, enforced token by token through llguidance (engine/structured.py)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: tuple = ()
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    json_schema: Union[None, str, dict] = None  # kept as its JSON text (key order kept: it is generation order)
    json_object: bool = False

    def __post_init__(self):
        if isinstance(self.json_schema, (dict, bool)):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except (TypeError, ValueError) as e:
                raise InvalidRequest(f"json_schema is not valid JSON: {e}", "response_format") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequest("json_schema must be a JSON Schema (an object)", "response_format")
            if self.json_object:
                raise InvalidRequest("json_schema and json_object exclude each other", "response_format")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}", "logprobs")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if not 0 <= self.temperature < math.inf:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}", "top_k")


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What a request must fit: the context length and the vocabulary."""

    max_model_len: int
    vocab_size: int


def check_request(prompt_ids: Sequence[int], sampling: SamplingParams, limits: RequestLimits,
                  clamp_length: bool = False) -> None:
    """Raise `InvalidRequest` or `RequestTooLong` if the request cannot run as asked; nothing else.

    The prompt must leave room for one generated token. `clamp_length=False` (the public API and
    the server, as vLLM's server): the prompt plus `max_tokens` must fit in max_model_len too;
    True: a request that runs into max_model_len stops there with finish_reason "length"."""
    n, limit = len(prompt_ids), limits.max_model_len
    if not n:
        raise InvalidRequest("the prompt is empty", "prompt")
    if n >= limit:
        raise RequestTooLong(f"This model's maximum context length is {limit} tokens, and the prompt has {n} tokens "
                             f"(max_model_len is {limit}: the prompt plus at least one generated token must fit). "
                             "Please reduce the length of the prompt.", "prompt")
    if min(prompt_ids) < 0 or max(prompt_ids) >= limits.vocab_size:
        bad = next(t for t in prompt_ids if not 0 <= t < limits.vocab_size)
        raise InvalidRequest(f"token id {bad} is outside the vocabulary (size {limits.vocab_size})", "prompt")
    if not clamp_length and n + sampling.max_tokens > limit:
        raise RequestTooLong(f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{n + sampling.max_tokens} tokens ({n} in the prompt, {sampling.max_tokens} in the "
                             "completion). Please reduce the length of the prompt or completion.", "max_tokens")


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class TokenLogprob(NamedTuple):
    """One generated (or prompt) token's log-probability, and those of the most likely tokens there."""

    token_id: int
    logprob: float
    top: tuple  # ((token id, logprob), ...) most likely first: SamplingParams.logprobs of them


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list
    token_ids: list
    text: str
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | "error" | None while running
    adapter: Optional[str] = None
    error: Optional[str] = None
    ttft_s: Optional[float] = None
    latency_s: Optional[float] = None
    logprobs: Optional[list] = None  # a TokenLogprob per token of token_ids, if SamplingParams.logprobs asked


class Request:
    def __init__(self, request_id: str, id_int: int, prompt_ids: list, adapter: Optional[str],
                 sampling: SamplingParams, seed: int, arrival: Optional[float] = None):
        self.id = request_id
        self.id_int = id_int  # the page table's sequence id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list = []
        self.adapter = adapter
        self.sampling = sampling
        self.seed = seed
        self.status = Status.WAITING
        self.num_computed = 0  # tokens whose K/V are in the pool (or being written by a dispatched step)
        self.page_keys: list = []  # prefix-cache chain keys of its full pages of known tokens (memory/cache.py)
        self.pages_registered = 0  # its leading pages offered to (or shared from) the prefix cache
        self.cached_tokens = 0  # tokens its last admission took from the prefix cache
        # Tokens sampled by dispatched steps but not read back yet (async mode): they count in num_tokens,
        # not in output_ids. The newest one sits in row `pending_row` of the step in flight.
        self.pending = 0
        self.pending_row = -1
        self.token_limit = len(self.prompt_ids) + sampling.max_tokens  # the engine caps it at max_model_len
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_token_time: Optional[float] = None
        self.finish_time: Optional[float] = None
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self.text = ""  # text emitted so far
        self.held = ""  # decoded text held back: it may be the start of a stop string
        self.preemptions = 0
        self.listeners: list = []  # callables(RequestOutput, delta_text) for streaming
        self.logprobs: Optional[list] = None if sampling.logprobs is None else []  # TokenLogprob per output token
        self.grammar = None  # its llguidance matcher (structured output), fed every token read

    @property
    def all_ids(self) -> list:
        """The tokens known on the host (without the pending ones)."""
        return self.prompt_ids + self.output_ids

    def known_ids(self, start: int, end: int) -> list:
        """all_ids[start:end] without building all_ids (the batch builder's per-step read)."""
        n_prompt = len(self.prompt_ids)
        if end <= n_prompt:
            return self.prompt_ids[start:end]
        if start >= n_prompt:
            return self.output_ids[start - n_prompt: end - n_prompt]
        return self.prompt_ids[start:] + self.output_ids[: end - n_prompt]

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens, including those still on the device."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.pending

    @property
    def complete(self) -> bool:
        """Every token it may generate by length has been sampled (some may not be read yet)."""
        return self.num_tokens >= self.token_limit

    @property
    def remaining_prefill(self) -> int:
        """Tokens to compute before the next sampled token (1 when decoding)."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def output(self) -> RequestOutput:
        now = self.finish_time or time.monotonic()
        return RequestOutput(
            self.id, self.prompt_ids, list(self.output_ids), self.text, self.finish_reason, self.adapter, self.error,
            None if self.first_token_time is None else self.first_token_time - self.arrival,
            None if self.finish_time is None else now - self.arrival,
            None if self.logprobs is None else list(self.logprobs))
