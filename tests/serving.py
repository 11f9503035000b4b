"""A real uvicorn server on loopback around one LLM, for tests that drive it with the official `openai` client."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
import types

import openai
import uvicorn

from server import create_app

API_KEY = "test-key"


@contextlib.contextmanager
def on_loopback(app):
    """Runs `app` in a real uvicorn server on a free loopback port; yields its base URL, stops it after."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def serving(llm, **app_kw):
    """Yields (base URL of the OpenAI routes, an `openai.OpenAI` client); stops the server (and the engine) after."""
    with on_loopback(create_app(llm, api_key=API_KEY, **app_kw)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        yield types.SimpleNamespace(base=base, url=base + "/v1", client=client,
                                    headers={"Authorization": f"Bearer {API_KEY}"})
