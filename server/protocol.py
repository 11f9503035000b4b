"""Pydantic models of the HTTP API: OpenAI's completions, chat, models and error shapes, our adapter
routes and vLLM's (load/unload_lora_adapter, tokenize, detokenize, version).

Pydantic checks only the JSON shape, with strict types (no "5" for 5); what a value may be (sampling
ranges, lengths) is checked once by slora_jax when the request is submitted. OpenAI fields we cannot
honour (penalties, tools, ...) are declared, their schema says the only values accepted,
and `unsupported()` names the first one a request sets otherwise: the route answers 400 "`X` is not
supported" rather than ignoring it. Unknown fields are ignored, as OpenAI's own server does. The
limits below (prompts, choices, stop strings) keep one request from flooding the engine queue; the
app's request-body limit bounds the rest.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per completions request
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 20  # most likely tokens per position (slora_jax's limit, OpenAI's for chat)
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


# -- errors ------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- requests ----------------------------------------------------------------------------
def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]  # strict, but 4.0 is the integer 4 (as in JSON Schema)


def _only(value, description: str):
    """A field whose schema admits only `value` (or null); other values are refused by `unsupported()`."""
    return Field(None, description=description, json_schema_extra={"minimum": value, "maximum": value})


def _range(**bounds) -> dict:
    """A range the schema documents but pydantic does not check: slora_jax checks it once, when the
    request is submitted (SamplingParams, check_request), and answers 400 naming the field."""
    return {"json_schema_extra": bounds}


TokenId = Annotated[Int, Field(**_range(minimum=0))]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: Optional[str] = Field(None, max_length=256)
    description: Optional[str] = None
    schema_: Union[dict[str, Any], bool, None] = Field(None, alias="schema", description="A JSON Schema (required).")
    strict: Optional[bool] = Field(None, description="Always strict: the schema is enforced token by token.")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = Field(None, description="With type json_schema.")


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = Field(
        None, description="An adapter name, or the base model's name (also 'base'); omitted: the base model.",
        examples=["base"])
    max_tokens: Optional[Int] = Field(None, description="Tokens to generate at most; the prompt plus max_tokens must "
                                      "fit in max_model_len.", **_range(minimum=1))
    temperature: Optional[float] = Field(None, description="0 is greedy; default 1.", **_range(minimum=0))
    top_p: Optional[float] = Field(None, **_range(exclusiveMinimum=0, maximum=1))
    top_k: Optional[Int] = Field(None, description="Extension: keep the k most likely tokens (0: off).",
                                 **_range(minimum=0))
    n: Int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, Annotated[list[str], Field(max_length=MAX_STOP)], None] = Field(
        None, description="Up to 16 strings; the text ends before the first.")
    stop_token_ids: Optional[list[Int]] = Field(None, max_length=64, description="Extension: token ids that end.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past the end-of-sequence token.")
    seed: Optional[Int] = Field(None, description="Choice i samples with seed + i.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = _only(0, "Not supported: only 0.")
    frequency_penalty: Optional[float] = _only(0, "Not supported: only 0.")
    repetition_penalty: Optional[float] = _only(1, "Extension, not supported: only 1.")
    logit_bias: Optional[dict[str, float]] = Field(None, description="Not supported: only empty.",
                                                   json_schema_extra={"maxProperties": 0})
    response_format: Optional[ResponseFormat] = Field(
        None, description="Structured output: {\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
        "\"json_schema\": {\"name\", \"schema\", \"strict\"}}, enforced token by token (llguidance); JSON comes "
        "out compact unless the schema's `x-guidance` says otherwise.")
    user: Optional[str] = None

    # field -> the values accepted (OpenAI's defaults); any other value is refused by `unsupported()`
    _ACCEPTED: ClassVar[dict] = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                                 "repetition_penalty": (None, 1), "logit_bias": (None, {})}

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(field, what is accepted) of the first field set to a value this server cannot honour."""
        for field, accepted in self._ACCEPTED.items():
            if getattr(self, field) not in accepted:
                shown = " or ".join("null" if v is None else json.dumps(v) for v in accepted)
                return field, shown
        return None


class CompletionRequest(_GenerationRequest):
    max_tokens: Optional[Int] = Field(None, description="Tokens to generate at most (default 16); the prompt plus "
                                      "max_tokens must fit in max_model_len. 0 only with echo: the prompt alone "
                                      "(with logprobs, its own log-probabilities).", **_range(minimum=0))
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]] = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token-id lists.",
        examples=["Hello"])
    echo: bool = Field(False, description="The prompt before the completion (and, with logprobs, the prompt "
                       "tokens' log-probabilities, the first null).")
    logprobs: Optional[Int] = Field(None, description="Return the log-probability of each token and of the "
                                    "`logprobs` most likely tokens at its position (of the raw model "
                                    "distribution, before temperature and top-k / top-p).",
                                    **_range(minimum=0, maximum=MAX_LOGPROBS))
    best_of: Optional[Int] = _only(1, "Not supported: only 1 or null.")
    suffix: Optional[str] = Field(None, description="Not supported: only empty or null.",
                                  json_schema_extra={"maxLength": 0})

    _ACCEPTED: ClassVar[dict] = {**_GenerationRequest._ACCEPTED, "best_of": (None, 1), "suffix": (None, "")}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"] = Field(..., description="Only text parts are supported.")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(..., min_length=1, examples=[[{"role": "user", "content": "Hi"}]])
    max_completion_tokens: Optional[Int] = Field(None, description="Preferred over max_tokens when both are set.",
                                                 **_range(minimum=1))
    logprobs: Optional[bool] = Field(None, description="Return each generated token's log-probability (of the raw "
                                     "model distribution, before temperature and top-k / top-p).")
    top_logprobs: Optional[Int] = Field(None, description="With logprobs: also the log-probabilities of the most "
                                        "likely tokens at each position, this many.",
                                        **_range(minimum=0, maximum=MAX_LOGPROBS))
    tools: Optional[list[Any]] = Field(None, description="Not supported: only empty.", json_schema_extra={"maxItems": 0})
    tool_choice: Optional[Union[str, dict]] = Field(None, description="Only 'none' (or 'auto' without tools).",
                                                    json_schema_extra={"enum": ["none", "auto", None]})
    functions: Optional[list[Any]] = Field(None, description="Not supported: only empty.",
                                           json_schema_extra={"maxItems": 0})
    function_call: Optional[Union[str, dict]] = Field(None, description="Not supported: only 'none'.",
                                                      json_schema_extra={"enum": ["none", None]})

    _ACCEPTED: ClassVar[dict] = {**_GenerationRequest._ACCEPTED, "tools": (None, []),
                                 "tool_choice": (None, "none", "auto"), "functions": (None, []),
                                 "function_call": (None, "none")}


class LoraLoadRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(..., pattern=ADAPTER_NAME_PATTERN, examples=["my-adapter"])
    lora_path: str = Field(..., min_length=1, max_length=4096,
                           description="A PEFT LoRA dir, relative to --adapter-dir or absolute inside it.")


class LoraUnloadRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(..., min_length=1, max_length=256)


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize: a prompt, or chat messages (rendered with the chat template)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: Optional[str] = None
    prompt: Optional[str] = Field(None, max_length=1 << 20)
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1)]] = None
    add_special_tokens: Optional[bool] = Field(None, description="Prompt: BOS first (default true); chat: false.")
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: Optional[str] = None
    tokens: list[TokenId] = Field(..., max_length=1 << 16)


class DetokenizeResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(..., pattern=ADAPTER_NAME_PATTERN, examples=["my-adapter"])
    path: str = Field(..., min_length=1, max_length=4096,
                      description="A PEFT LoRA dir, relative to --adapter-dir or absolute inside it.",
                      examples=["my-adapter"])
    replace: bool = Field(False, description="Replace an adapter already registered under this name.")


# -- responses ---------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token (with echo, the prompt's first; its log-probability null)."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slora-jax"
    root: str
    parent: Optional[str] = None
    max_model_len: int
    rank: Optional[int] = Field(None, description="Adapters: the largest rank over their modules.")
    ranks: Optional[dict[str, int]] = Field(None, description="Adapters: rank per target module.")
    resident: Optional[bool] = Field(None, description="Adapters: whether its weights are in the device pool now.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class Health(BaseModel):
    status: str
