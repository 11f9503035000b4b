"""The ASGI middleware in front of every route: the API key, the request-body size limit, JSON bodies.

It is plain ASGI rather than a FastAPI dependency so that it refuses a request
before any body is read: a wrong key, or a Content-Length over the limit, is
answered at once, and a chunked body is cut off as soon as it grows too large.
Every body is JSON whatever its Content-Type says (`curl -d` sends a form type,
some clients none), as vLLM's and OpenAI's servers read them.
"""
from __future__ import annotations

import hmac
from typing import Optional

from starlette.datastructures import Headers

from .errors import error_response
from .metrics import Metrics

MAX_BODY_BYTES = 1 << 20


def _as_json(scope: dict) -> dict:
    """The scope with its Content-Type set to JSON, so that FastAPI parses the body as JSON."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}


class RequestGuard:
    """Bearer auth on every route but /health (so that probes need no key), the body size limit, JSON bodies."""

    def __init__(self, app, api_key: Optional[str], max_body: int, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body, metrics
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.key is not None and scope["path"] != "/health":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            # constant-time comparison: the time taken must not reveal how much of the key matched
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"), self.key):
                resp = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                                      metrics=self.metrics)
                return await resp(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body):
            bad = not length.strip().isdigit()
            resp = error_response(400 if bad else 413, "Invalid Content-Length header." if bad else
                                  f"The request body exceeds the limit of {self.max_body} bytes.",
                                  code=None if bad else "request_too_large", metrics=self.metrics)
            return await resp(scope, receive, send)

        if scope["method"] in ("POST", "PUT", "PATCH") and "json" not in headers.get("content-type", ""):
            scope = _as_json(scope)
        seen, rejected = 0, False

        async def limited_receive():
            nonlocal seen, rejected
            msg = await receive()
            if msg["type"] == "http.request" and not rejected:
                seen += len(msg.get("body", b""))
                if seen > self.max_body:  # a chunked body without Content-Length
                    rejected = True
                    await error_response(413, f"The request body exceeds the limit of {self.max_body} bytes.",
                                         code="request_too_large", metrics=self.metrics)(scope, receive, send)
                    return {"type": "http.disconnect"}  # the route stops reading; its own response is dropped below
            return msg

        async def guarded_send(msg):
            if not rejected:
                await send(msg)

        await self.app(scope, limited_receive, guarded_send)
