"""The HTTP server end to end: a real uvicorn on loopback, driven by the official `openai` client and raw httpx.

One tiny float32 model (XLA kernels, CPU) with the CLI's demo adapters serves
the whole module; tests run in file order and leave the engine idle.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import types

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save_file
from starlette.testclient import TestClient

import slora_jax
from server import create_app, protocol, serve
from slora_jax import LLM
from slora_jax.cli import DEMO_ADAPTERS, add_demo_adapters
from slora_jax.tokenizer import ByteTokenizer
from tests.serving import on_loopback

API_KEY = "test-key"
MAX_MODEL_LEN = 128
ERROR_KEYS = {"message", "type", "param", "code"}


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    adapter_dir = tmp_path_factory.mktemp("adapters")
    outside = tmp_path_factory.mktemp("outside")
    # Few, large pages and small batches: every distinct step shape costs a compile of seconds on CPU.
    llm = LLM("tiny", dtype="float32", kernels="xla", num_pages=96, page_rows=32, max_model_len=MAX_MODEL_LEN,
              max_batch_tokens=128, max_running=8)
    add_demo_adapters(llm)
    llm.warmup()  # what `serve` does: every step shape compiled before the first request
    with on_loopback(create_app(llm, api_key=API_KEY, adapter_dir=str(adapter_dir))) as base:
        yield types.SimpleNamespace(llm=llm, base=base, url=base + "/v1", adapter_dir=adapter_dir, outside=outside)
    assert not llm.is_running, "shutdown did not stop the engine thread"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def wait_idle(llm, timeout: float = 30.0) -> dict:
    """Poll until no request holds KV pages (aborted or finished), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        s = llm.stats()
        if s["pages_kv"] == 0 and s["requests_running"] == 0 and s["requests_waiting"] == 0:
            return s
        if time.monotonic() > deadline:
            pytest.fail(f"the engine did not go idle within {timeout}s: {s}")
        time.sleep(0.05)


def assert_error(resp: httpx.Response, status: int, code=None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    return err


def write_peft(path, cfg, r: int = 4, modules=("q_proj", "v_proj"), seed: int = 0, bad_shape: bool = False) -> str:
    """A PEFT LoRA dir: adapter_config.json + adapter_model.safetensors (A [r, in], B [out, r])."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for m in modules:
            d_in, d_out = cfg.module_shape(m)
            key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, 0.1, (r, d_in + int(bad_shape))).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.1, (d_out, r)).astype(np.float32)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules)}, f)
    return str(path)


def stream_text(stream) -> tuple[str, list, object]:
    """(concatenated text, finish reasons seen, usage) of a completions stream."""
    text, reasons, usage = "", [], None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            text += c.text
            if c.finish_reason is not None:
                reasons.append(c.finish_reason)
    return text, reasons, usage


# -- health, auth, models --------------------------------------------------------------------------
def test_health_is_open_and_everything_else_needs_the_key(served, client):
    r = httpx.get(served.base + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        assert_error(httpx.get(served.base + path), 401, "invalid_api_key")
    assert_error(httpx.get(served.base + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    bad = openai.OpenAI(base_url=served.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="base", prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and set(e.value.body) >= {"message", "type", "code"}


def test_models_lists_base_and_adapters_with_rank_and_residency(served, client):
    models = {m.id: m for m in client.models.list().data}
    base = served.llm.model_cfg.name
    assert base == "tiny-llama" and base in models and set(DEMO_ADAPTERS) <= set(models)
    assert models[base].parent is None and models[base].max_model_len == MAX_MODEL_LEN
    for name, rank in DEMO_ADAPTERS.items():
        extra = models[name].model_dump()
        assert extra["rank"] == rank and extra["parent"] == base and isinstance(extra["resident"], bool)
    assert client.models.retrieve("demo-coder").id == "demo-coder"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# -- generation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["base", "demo-pirate"])
def test_completion_stream_equals_non_stream_with_usage(served, client, model):
    prompt = "The quick brown fox"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == model and choice.finish_reason in ("stop", "length")
    n_prompt = len(served.llm.tokenizer.encode(prompt))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 12
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12

    stream = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    text, reasons, usage = stream_text(stream)
    assert text == choice.text and reasons == [choice.finish_reason]
    assert usage is not None and usage.model_dump() == r.usage.model_dump()


def test_chat_stream_equals_non_stream_with_plain_template(served, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="demo-poet", messages=messages, max_tokens=10, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    expected = "<|system|>\nBe brief.\n<|user|>\nHello there\n<|assistant|>\n"
    assert r.usage.prompt_tokens == len(served.llm.tokenizer.encode(expected))
    assert choice.finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 10

    stream = client.chat.completions.create(model="demo-poet", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content and reasons == [choice.finish_reason]
    assert chunks[-1].usage.model_dump() == r.usage.model_dump() and chunks[-1].choices == []


def test_n_seed_stop_and_prompt_lists(served, client):
    kw = dict(model="demo-coder", prompt="Once upon a time", max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in sorted(a.choices, key=lambda c: c.index)] == \
           [c.text for c in sorted(b.choices, key=lambda c: c.index)]

    batch = client.completions.create(model="base", prompt=["one", "two"], n=2, max_tokens=4, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in batch.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: equal per prompt
    assert batch.usage.prompt_tokens == sum(len(served.llm.tokenizer.encode(p)) for p in ("one", "two"))

    ids = served.llm.tokenizer.encode("one")
    tok = client.completions.create(model="base", prompt=ids, max_tokens=4, temperature=0)
    assert tok.choices[0].text == by_index[0]

    full = client.completions.create(model="base", prompt="Stop here:", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    firsts = [(k, ch) for k, ch in enumerate(full) if k > 0 and ch.isascii() and ch.isprintable() and full.index(ch) == k]
    if firsts:  # stop on a character's first occurrence: the text ends right before it
        k, ch = firsts[-1]
        r = client.completions.create(model="base", prompt="Stop here:", max_tokens=16, temperature=0, stop=[ch],
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == full[:k] and r.choices[0].finish_reason == "stop"


def test_unknown_model_is_404_in_openai_shape(client):
    calls = [
        lambda s: client.completions.create(model="nope", prompt="hi", max_tokens=2, stream=s),
        lambda s: client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], stream=s),
    ]
    for call in calls:
        for stream in (False, True):
            with pytest.raises(openai.NotFoundError) as e:
                call(stream)
            assert e.value.status_code == 404 and e.value.code == "model_not_found"


def test_malformed_requests_get_4xx_in_openai_shape(served, http):
    cases = [
        ("/v1/completions", b"{", 400), ("/v1/completions", b"[]", 400), ("/v1/completions", b"", 400),
        ("/v1/completions", {"prompt": 5}, 400), ("/v1/completions", {"model": "base"}, 400),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400), ("/v1/completions", {"prompt": "x", "n": 0}, 400),
        ("/v1/completions", {"prompt": []}, 400), ("/v1/completions", {"prompt": [[]]}, 400),
        ("/v1/completions", {"prompt": [1, 99999]}, 400), ("/v1/completions", {"prompt": [-1]}, 400),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400),
        ("/v1/completions", {"prompt": "x", "response_format": {"type": "yaml"}}, 400),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 1.0}, 400),
        ("/v1/completions", {"prompt": "x" * MAX_MODEL_LEN}, 400),
        ("/v1/chat/completions", {"messages": []}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * MAX_MODEL_LEN}]}, 400),
        ("/v1/adapters", {"name": "../x", "path": "x"}, 400), ("/v1/adapters", {"name": "x"}, 400),
    ]
    for path, body, status in cases:
        resp = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
        assert_error(resp, status)
    err = assert_error(http.post("/v1/completions", json={"prompt": "x" * MAX_MODEL_LEN}), 400)
    assert err["code"] == "context_length_exceeded" and str(MAX_MODEL_LEN) in err["message"]
    assert assert_error(http.post("/v1/completions", json={"prompt": "x", "n": 0}), 400)["param"] == "n"
    assert_error(http.post("/v1/completions", content="prompt=x", headers={"Content-Type": "text/plain"}), 400)
    assert_error(http.get("/v1/no-such-route"), 404)
    assert_error(http.delete("/v1/completions"), 405)

    big = {"model": "base", "prompt": "a" * ((1 << 20) + 16)}
    assert_error(http.post("/v1/completions", json=big), 413, "request_too_large")

    def chunked():  # no Content-Length: the limit applies while reading
        for _ in range(20):
            yield b" " * 65536
        yield b"{}"

    assert_error(http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}), 413)
    assert http.get("/health").status_code == 200
    wait_idle(served.llm)


# -- adapters at runtime --------------------------------------------------------------------------------
def test_runtime_adapter_load_use_unload(served, client, http):
    cfg = served.llm.model_cfg
    write_peft(served.adapter_dir / "peft-a", cfg, r=4)
    r = http.post("/v1/adapters", json={"name": "peft-a", "path": "peft-a"})
    assert r.status_code == 200, r.text
    card = r.json()
    assert card["id"] == "peft-a" and card["rank"] == 4 and card["ranks"] == {"q_proj": 4, "v_proj": 4}
    assert "peft-a" in {m.id for m in client.models.list().data}

    out = client.completions.create(model="peft-a", prompt="Hello", max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert any(a["name"] == "peft-a" and a["resident"] for a in served.llm.adapters())

    assert_error(http.post("/v1/adapters", json={"name": "peft-a", "path": "peft-a"}), 409)
    assert http.post("/v1/adapters", json={"name": "peft-a", "path": "peft-a", "replace": True}).status_code == 200
    absolute = str(served.adapter_dir / "peft-a")
    assert http.post("/v1/adapters", json={"name": "peft-b", "path": absolute}).status_code == 200
    assert_error(http.post("/v1/adapters", json={"name": "base", "path": "peft-a"}), 409)

    write_peft(served.adapter_dir / "bad-shape", cfg, bad_shape=True)
    err = assert_error(http.post("/v1/adapters", json={"name": "bad", "path": "bad-shape"}), 400)
    assert "lora_A" in err["message"] and str(served.adapter_dir) not in err["message"]
    assert_error(http.post("/v1/adapters", json={"name": "missing", "path": "no-such-dir"}), 404)

    for name in ("peft-a", "peft-b"):
        r = http.delete(f"/v1/adapters/{name}")
        assert r.status_code == 200 and r.json() == {"id": name, "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="peft-a", prompt="Hello", max_tokens=2)
    assert_error(http.delete("/v1/adapters/peft-a"), 404, "model_not_found")
    assert_error(http.delete("/v1/adapters/tiny-llama"), 400)
    assert "peft-a" not in {a["name"] for a in served.llm.adapters()}


def test_adapter_paths_outside_the_adapter_dir_get_403(served, http):
    cfg = served.llm.model_cfg
    target = write_peft(served.outside / "evil", cfg)
    root = served.adapter_dir
    os.symlink(target, root / "link-out")
    os.makedirs(root / "half-link")
    with open(os.path.join(target, "adapter_config.json")) as f:
        (root / "half-link" / "adapter_config.json").write_text(f.read())
    os.symlink(os.path.join(target, "adapter_model.safetensors"), root / "half-link" / "adapter_model.safetensors")
    rel = os.path.relpath(target, root)
    assert rel.startswith("..")
    for path in (rel, target, "link-out", "half-link", "../" + os.path.basename(root) + "/../" + rel, "/etc",
                 "peft-x/../../" + os.path.basename(served.outside) + "/evil"):
        err = assert_error(http.post("/v1/adapters", json={"name": "evil", "path": path}), 403)
        assert os.path.realpath(target) not in err["message"].replace(path, "")  # where a link points stays hidden
    assert "evil" not in {a["name"] for a in served.llm.adapters()}

    no_dir = TestClient(create_app(served.llm, adapter_dir=None))  # no lifespan: the live engine is untouched
    assert_error(no_dir.post("/v1/adapters", json={"name": "x", "path": "x"}), 403)


def test_vllm_adapter_routes(served, client, http):
    write_peft(served.adapter_dir / "v-lora", served.llm.model_cfg, r=8)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "v-lora", "lora_path": "v-lora"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'v-lora' added successfully."
    assert client.completions.create(model="v-lora", prompt="Hi", max_tokens=3, temperature=0).choices
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "v-lora", "lora_path": "v-lora"}), 409,
                 "adapter_exists")
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "../x"}), 403)
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "v-lora"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'v-lora' removed successfully."
    assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "v-lora"}), 404, "model_not_found")
    with pytest.raises(openai.NotFoundError):  # unloaded by a route: not loaded on first use again
        client.completions.create(model="v-lora", prompt="Hi", max_tokens=3)


def test_adapters_in_the_adapter_dir_load_on_first_use(served, client, http):
    write_peft(served.adapter_dir / "lazy-one", served.llm.model_cfg, r=4, seed=3)
    assert "lazy-one" not in {a["name"] for a in served.llm.adapters()}
    r = client.chat.completions.create(model="lazy-one", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.model == "lazy-one" and r.choices[0].finish_reason in ("stop", "length")
    models = http.get("/v1/models")
    assert "lazy-one" in {m["id"] for m in models.json()["data"]}
    assert str(served.adapter_dir) not in models.text and str(served.outside) not in models.text  # no server paths
    os.makedirs(served.adapter_dir / "not-an-adapter")
    for name in ("not-an-adapter", "link-out", "half-link", "..", "../outside"):  # none servable, nothing leaks
        err = assert_error(http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2}), 404,
                           "model_not_found")
        assert str(served.adapter_dir) not in err["message"]
    assert http.delete("/v1/adapters/lazy-one").status_code == 200
    wait_idle(served.llm)


def test_tokenize_detokenize_version(served, http):
    tok = served.llm.tokenizer
    r = http.post("/tokenize", json={"prompt": "héllo"}).json()
    assert r["tokens"] == tok.encode("héllo") and r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/tokenize", json={"prompt": "héllo", "add_special_tokens": False}).json()["tokens"] == \
        tok.encode("héllo", add_bos=False)
    chat = http.post("/tokenize", json={"model": "demo-coder", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tok.encode("<|user|>\nhi\n<|assistant|>\n")
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "héllo"}
    assert_error(http.post("/detokenize", json={"tokens": [10 ** 6]}), 400)
    assert_error(http.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "model_not_found")
    assert_error(http.post("/tokenize", json={}), 400)
    assert http.get("/version").json() == {"version": slora_jax.__version__}


@pytest.mark.parametrize("path,field,value", [
    ("/v1/completions", "presence_penalty", 0.5), ("/v1/completions", "frequency_penalty", -1.0),
    ("/v1/completions", "best_of", 2), ("/v1/completions", "suffix", "end"),
    ("/v1/completions", "logit_bias", {"5": 1.0}), ("/v1/chat/completions", "tools", [{"type": "function"}]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "repetition_penalty", 1.2),
])
def test_unsupported_fields_are_named(http, path, field, value):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    err = assert_error(http.post(path, json={**body, field: value, "max_tokens": 2}), 400)
    assert err["message"].startswith(f"`{field}` is not supported") and err["param"] == field
    defaults = {"presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1, "suffix": "",
                "logit_bias": {}, "tools": [], "tool_choice": "none", "repetition_penalty": 1.0}
    assert http.post(path, json={**body, field: defaults[field], "max_tokens": 2}).status_code == 200


def test_a_body_is_json_whatever_its_content_type(served):
    body = json.dumps({"model": "base", "prompt": "hi", "max_tokens": 2}).encode()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for content_type in (None, "application/x-www-form-urlencoded", "text/plain"):
        headers = auth if content_type is None else {**auth, "Content-Type": content_type}
        with httpx.Client(timeout=120) as c:  # raw bytes: httpx sets no Content-Type of its own
            r = c.post(served.base + "/v1/completions", content=body, headers=headers)
            assert content_type is not None or "content-type" not in r.request.headers
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text


# -- load, disconnects, failures -----------------------------------------------------------------------------
def test_64_concurrent_streaming_clients_all_complete(served):
    models = ["base", *DEMO_ADAPTERS]

    async def one(aclient, i):
        stream = await aclient.completions.create(
            model=models[i % len(models)], prompt=f"client {i} says", max_tokens=16, temperature=0 if i % 2 else 0.8,
            seed=i, stream=True, stream_options={"include_usage": True})
        text, reasons, usage = "", [], None
        async for ch in stream:
            usage = ch.usage or usage
            for c in ch.choices:
                text += c.text
                reasons += [c.finish_reason] if c.finish_reason else []
        return text, reasons, usage

    async def main():
        aclient = openai.AsyncOpenAI(base_url=served.url, api_key=API_KEY, max_retries=0, timeout=120,
                                     http_client=openai.DefaultAsyncHttpxClient(
                                         limits=httpx.Limits(max_connections=128)))
        try:
            return await asyncio.gather(*(one(aclient, i) for i in range(64)))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert len(results) == 64
    for text, reasons, usage in results:
        assert len(reasons) == 1 and reasons[0] in ("stop", "length")
        assert usage is not None and 1 <= usage.completion_tokens <= 16
    wait_idle(served.llm)


def test_disconnecting_clients_abort_and_free_pages(served, monkeypatch):
    llm = served.llm
    real_step = llm.engine.runner.step

    def slow_step(*args, **kw):  # 20 ms a step: no request can finish before its client leaves
        time.sleep(0.02)
        return real_step(*args, **kw)

    monkeypatch.setattr(llm.engine.runner, "step", slow_step)
    before = llm.stats()["requests_aborted"]
    body = {"model": "demo-pirate", "prompt": "tell me a long story", "max_tokens": 100, "temperature": 0,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def streaming_quitter():
        with httpx.Client(base_url=served.base, headers=headers, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 2:
                        break  # leaving the block closes the connection mid-stream

    def impatient():
        with httpx.Client(base_url=served.base, headers=headers, timeout=0.5) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "go"}]})

    threads = [threading.Thread(target=f) for f in [streaming_quitter] * 4 + [impatient] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    s = wait_idle(llm, timeout=20)
    assert s["pages_kv"] == 0
    assert s["requests_aborted"] - before == 8, "every disconnected client's request is aborted, not run to the end"
    with httpx.Client(base_url=served.base, headers=headers) as c:
        _, samples = metric_samples(c.get("/metrics").text)
    assert samples[("slora_requests_total", (("endpoint", "chat"), ("finish_reason", "abort")))] >= 4


def test_an_engine_step_failure_fails_its_requests_but_not_the_server(served, client, monkeypatch):
    runner = served.llm.engine.runner
    real_step = runner.step
    armed = {"on": True}

    def flaky(*args, **kw):
        if armed["on"]:
            armed["on"] = False
            raise RuntimeError("injected failure")
        return real_step(*args, **kw)

    monkeypatch.setattr(runner, "step", flaky)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="base", prompt="boom", max_tokens=4)
    assert e.value.status_code == 500 and "engine" in e.value.message
    armed["on"] = True
    with pytest.raises(openai.APIError):
        for _ in client.completions.create(model="demo-poet", prompt="boom", max_tokens=4, stream=True):
            pass
    ok = client.completions.create(model="demo-poet", prompt="fine", max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(served.base + "/health").status_code == 200
    wait_idle(served.llm)


# -- metrics, templates, serve ---------------------------------------------------------------------------------
def metric_samples(text: str) -> tuple:
    """(families by name, {(sample name, sorted labels): value}) of a /metrics page."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return families, {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}


def test_metrics_in_prometheus_format(served, http):
    # its own traffic (an adapter's completion, to its length), whatever ran before it
    r = http.post("/v1/completions", json={"model": "demo-coder", "prompt": "metrics", "max_tokens": 3,
                                           "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families, samples = metric_samples(r.text)
    for name in ("slora_requests", "slora_prompt_tokens", "slora_generation_tokens", "slora_http_errors",
                 "slora_time_to_first_token_seconds", "slora_inter_token_latency_seconds",
                 "slora_e2e_request_latency_seconds", "slora_pool_pages", "slora_pool_pages_capacity",
                 "slora_adapters_resident", "slora_adapter_swaps", "slora_requests_running", "slora_engine_up"):
        assert name in families, name
    assert families["slora_time_to_first_token_seconds"].type == "histogram"
    assert samples[("slora_time_to_first_token_seconds_count", ())] > 0
    assert samples[("slora_inter_token_latency_seconds_count", ())] > 0
    pages = {s.labels["kind"]: s.value for s in families["slora_pool_pages"].samples}
    assert set(pages) == {"kv", "adapter", "cached", "free"}
    assert sum(pages.values()) == samples[("slora_pool_pages_capacity", ())] == served.llm.stats()["pages_total"]
    assert samples[("slora_prefix_query_tokens_total", ())] > 0
    assert samples[("slora_engine_host_seconds_total", ())] > 0
    assert samples[("slora_adapters_resident", ())] >= 1
    assert samples[("slora_adapter_swaps_total", (("direction", "in"),))] >= 1
    assert samples[("slora_requests_total", (("endpoint", "completions"), ("finish_reason", "length")))] > 0


def test_chat_template_from_the_tokenizer_is_used(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from server.errors import ApiError
    from slora_jax import InvalidRequest
    from slora_jax.tokenizer import HFTokenizer

    vocab = {"<s>": 0, "</s>": 1, "[INST]": 2, "[/INST]": 3, "hi": 4, "there": 5, "[UNK]": 6}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "</s>", "[INST]", "[/INST]"])
    hf.save(str(tmp_path / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = HFTokenizer(str(tmp_path), bos_id=0, eos_ids=(1,))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"},
            {"role": "user", "content": "hi there"}]
    assert tok.apply_chat_template(msgs) == [0, 2, 4, 3, 5, 1, 2, 4, 5, 3]  # special tokens as tokens, one BOS

    tok = HFTokenizer(str(tmp_path), bos_id=0, eos_ids=(1,), chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequest) as e:
        tok.apply_chat_template(msgs)
    err = ApiError.of(e.value)  # what the server answers
    assert err.status == 400 and "roles must alternate" in err.message

    byte = ByteTokenizer(bos_id=256, eos_ids=(257,))
    assert byte.chat_template is None  # the tiny model: the plain, documented template
    assert byte.apply_chat_template(msgs[:1]) == byte.encode("<|user|>\nhi\n<|assistant|>\n")


def test_serve_prints_where_it_listens(served, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    serve(served.llm, host="127.0.0.1", port=8123, api_key="k", adapter_dir=None, warmup=False)
    assert calls and calls[0]["port"] == 8123
    assert "http://127.0.0.1:8123/v1" in capsys.readouterr().out
    serve(served.llm, port=8124, served_model_name="my-model", warmup=True)  # compiled already: quick
    out = capsys.readouterr()
    assert "'my-model'" in out.out and "compiling step programs" in out.err  # a progress bar while compiling


# -- schema fuzzing ---------------------------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_errors_or_schema_violations(served):
    """Fuzz every operation of /openapi.json with valid and invalid data: no 5xx, and each response (SSE events
    included) conforms to the schema. Not checked: that every schema-valid request is accepted, since a valid
    prompt may still exceed the vocabulary or the context length (400)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    auth = {"Authorization": f"Bearer {API_KEY}"}
    schema = schemathesis.openapi.from_url(served.base + "/openapi.json", headers=auth)

    def cap(case):  # keep generation short on CPU: the schema allows max_model_len tokens x 64 prompts x 16
        # Only values the schema allows are lowered: a negative case's out-of-range value must stay out of
        # range, or the fuzzer reports the now-valid request's 200 as an invalid request accepted.
        body = case.body
        if isinstance(body, dict):
            for key, most, limit in (("max_tokens", 4, None), ("max_completion_tokens", 4, None),
                                     ("n", 2, protocol.MAX_N)):
                v = body.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and most < v <= (limit or v):
                    body[key] = most
            prompt = body.get("prompt")
            if isinstance(prompt, list) and 4 < len(prompt) <= protocol.MAX_PROMPTS:
                body["prompt"] = prompt[:4]
        return case

    failures, statuses = [], []
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        @settings(max_examples=150, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode).map(cap))
        def fuzz(case):
            try:  # record rather than raise: a raised failure would make hypothesis shrink it, for minutes
                resp = case.call_and_validate(base_url=served.base, headers=auth, timeout=60,
                                              excluded_checks=[positive_data_acceptance])
                statuses.append(resp.status_code)
            except FailureGroup as e:
                failures.append(f"{case.method} {case.path} {case.body!r:.300}: {e}"[:2000])

        fuzz()
    assert not failures, "\n\n".join(failures[:3])
    assert statuses and max(statuses) < 500 and 200 in statuses
    assert httpx.get(served.base + "/health").status_code == 200
    wait_idle(served.llm)
