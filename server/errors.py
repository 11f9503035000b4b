"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the handlers that make them.

slora_jax raises typed errors (`slora_jax.errors`); `STATUS` below is the one place that says which
HTTP status and OpenAI error code each type answers with. `ApiError` is for what only HTTP knows
(a path outside --adapter-dir, an unsupported field, a client gone). Every error leaves the server
through `error_response` (the guard's refusals too), so each one is counted in the metrics by status.
"""
from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slora_jax.errors import (AdapterError, AdapterExists, AdapterInUse, AdapterNotFound, CapacityError, ConfigError,
                              InvalidAdapter, InvalidRequest, ProcessLost, RequestError, RequestTooLong, SloraError)

from .metrics import Metrics
from .protocol import ErrorResponse

log = logging.getLogger("slora_jax.server")

# slora_jax's error types -> (HTTP status, OpenAI error code). The most specific type listed wins.
STATUS: dict[type, tuple[int, Optional[str]]] = {
    AdapterNotFound: (404, "model_not_found"),
    AdapterExists: (409, "adapter_exists"),
    AdapterInUse: (409, "adapter_in_use"),
    InvalidAdapter: (400, "invalid_adapter"),
    AdapterError: (400, None),
    RequestTooLong: (400, "context_length_exceeded"),
    InvalidRequest: (400, None),
    RequestError: (400, None),
    CapacityError: (503, "insufficient_capacity"),
    ProcessLost: (503, "process_lost"),
    ConfigError: (500, None),
    SloraError: (500, None),
}

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 500: "server_error",
                503: "service_unavailable"}

# The OpenAPI `responses=` entry of a route for every status it may answer with.
ERROR_DOCS: dict = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 413, 500, 503)}


class ApiError(Exception):
    """An error a route raises to answer with `status` and this message in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def of(cls, e: SloraError) -> "ApiError":
        """The answer to one of slora_jax's errors, by its type (`STATUS`)."""
        status, code = next(STATUS[t] for t in type(e).__mro__ if t in STATUS)
        return cls(status, e.message, e.param, code)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    etype = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict] = None, metrics: Optional[Metrics] = None) -> JSONResponse:
    if metrics is not None:
        metrics.errors.labels(status=str(status)).inc()
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _param_of(error: dict) -> Optional[str]:
    """'messages.0.role' from a pydantic error location, without 'body' and union member tags like 'list[int]'."""
    parts = [str(x) for x in error.get("loc", ()) if x != "body"]
    parts = [p for p in parts if not ("[" in p or p in ("str", "int", "float", "bool", "list", "dict", "none"))]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Answer every exception a route raises with an OpenAI-shaped error, counted in `metrics`."""

    def answer(e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.headers, metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return answer(e)

    @app.exception_handler(SloraError)
    async def _slora_error(_, e: SloraError):
        if STATUS.get(type(e), (400,))[0] >= 500:
            log.error("request failed: %s", e)
        return answer(ApiError.of(e))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        errors = list(e.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return answer(ApiError(400, f"The request body is not valid JSON ({detail})."))
        param = _param_of(first)
        same = [e for e in errors if _param_of(e) == param]  # a union field reports one error per member type
        msg = "; ".join(dict.fromkeys(str(e.get("msg", "invalid value")) for e in same))
        msg = f"{param}: {msg}" if param else msg
        if len(errors) > len(same):
            msg += f" (and {len(errors) - len(same)} more error(s))"
        return answer(ApiError(400, msg, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return answer(ApiError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal_error(_, e: Exception):
        log.exception("unhandled error", exc_info=e)
        return answer(ApiError(500, "internal server error"))
