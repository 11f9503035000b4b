"""Pydantic models of the HTTP API: OpenAI's completions, chat, models and error shapes, plus our adapter routes.

Requests accept OpenAI's fields, with strict types (no "5" for 5). Those we cannot honour (logprobs, tools,
penalties, ...) are declared with the only values we accept, so that the
schema says what the server does and anything else is a 400 rather than
silently ignored; unknown fields are ignored, as OpenAI's own server does.
The limits below (prompts, choices, stop strings) keep one request from
flooding the engine queue; the app's request-body limit bounds the rest.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per completions request
MAX_STOP = 16  # stop strings per request
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
TokenIds = Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = Field(
        None, description="An adapter name, or the base model's name (also 'base'); omitted: the base model.",
        examples=["base"])
    max_tokens: Optional[Int] = Field(None, ge=1, description="Tokens to generate at most (capped by max_model_len).")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 is greedy; default 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[Int] = Field(None, ge=0, description="Extension: keep the k most likely tokens (0: off).")
    n: Int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, Annotated[list[str], Field(max_length=MAX_STOP)], None] = Field(
        None, description="Up to 16 strings; the text ends before the first.")
    stop_token_ids: Optional[list[Int]] = Field(None, max_length=64, description="Extension: token ids that end.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past the end-of-sequence token.")
    seed: Optional[Int] = Field(None, description="Choice i samples with seed + i.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=0, le=0, description="Not supported: only 0.")
    frequency_penalty: Optional[float] = Field(None, ge=0, le=0, description="Not supported: only 0.")
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=0, description="Not supported: only empty.")
    user: Optional[str] = None


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]] = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token-id lists.",
        examples=["Hello"])
    echo: bool = False
    logprobs: Optional[Int] = Field(None, ge=0, le=0, description="Not supported: only 0 or null.")
    best_of: Optional[Int] = Field(None, ge=1, le=1, description="Not supported: only 1 or null.")
    suffix: Optional[str] = Field(None, max_length=0, description="Not supported: only empty or null.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"] = Field(..., description="Only text parts are supported.")
    text: str


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"] = Field(..., description="Only plain text is supported.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(..., min_length=1, examples=[[{"role": "user", "content": "Hi"}]])
    max_completion_tokens: Optional[Int] = Field(None, ge=1, description="Preferred over max_tokens when both are set.")
    logprobs: Optional[Literal[False]] = Field(None, description="Not supported: only false or null.")
    top_logprobs: Optional[Int] = Field(None, ge=0, le=0, description="Not supported: only 0 or null.")
    tools: Optional[list[Any]] = Field(None, max_length=0, description="Not supported: only empty.")
    tool_choice: Optional[Literal["none"]] = Field(None, description="Only 'none' is supported.")
    response_format: Optional[ResponseFormat] = None


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


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
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


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
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
    source: Optional[str] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class Health(BaseModel):
    status: str
