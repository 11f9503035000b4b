"""Log-probabilities through the official `openai` client on a real server: OpenAI's shapes for completions
and chat (streamed too), values equal to log_softmax of `LLM.logits` at those positions (float32, 1e-4), raw
(before temperature), with and without an adapter; `echo` with `max_tokens` 0 scores the prompt itself (how
lm-evaluation-harness's `local-completions` computes loglikelihood), and the Python API's own."""
from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from slora_jax import LLM, SamplingParams
from slora_jax.cli import add_demo_adapters
from tests.serving import serving

ATOL = 1e-4


@pytest.fixture(scope="module")
def srv():
    llm = LLM("tiny", dtype="float32", kernels="xla", num_pages=96, page_rows=32, max_model_len=128,
              max_batch_tokens=128, max_running=8)
    add_demo_adapters(llm)
    llm.warmup()
    with serving(llm) as s:
        s.llm = llm
        yield s


def log_softmax(llm, ids: list, adapter) -> np.ndarray:
    x = llm.logits(ids, adapter).astype(np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def generated(llm, prompt: list, adapter, sp: SamplingParams):
    """The same request through the Python API (the server's engine runs in its thread: submit and wait)."""
    h = llm.submit(prompt, adapter, sp)
    deadline = time.monotonic() + 60
    while not h.finished:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return h.output()


@pytest.mark.parametrize("model", ["base", "demo-pirate"])
def test_chat_logprobs_equal_the_log_softmax_of_the_logits(srv, model):
    adapter = None if model == "base" else model
    messages = [{"role": "user", "content": "Hello there"}]
    kw = dict(model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    r = srv.client.chat.completions.create(**kw)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens
    prompt = srv.llm.apply_chat_template(messages)
    out = generated(srv.llm, prompt, adapter, SamplingParams(max_tokens=6, logprobs=5))
    assert out.text == choice.message.content and len(out.logprobs) == len(out.token_ids) == len(content)
    ref = log_softmax(srv.llm, prompt + out.token_ids, adapter)
    for j, (e, tok) in enumerate(zip(content, out.token_ids)):
        row = ref[len(prompt) - 1 + j]
        assert e.logprob == pytest.approx(row[tok], abs=ATOL)
        assert e.token == srv.llm.decode([tok]) and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 5
        np.testing.assert_allclose([t.logprob for t in e.top_logprobs], np.sort(row)[::-1][:5], atol=ATOL)
        assert out.logprobs[j].token_id == tok and out.logprobs[j].logprob == pytest.approx(row[tok], abs=ATOL)
    # streamed: the same entries, one chunk per token
    chunks = list(srv.client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    np.testing.assert_allclose([e.logprob for e in streamed], [e.logprob for e in content], atol=ATOL)
    # logprobs without top_logprobs: each entry's own, and an empty top list
    plain = srv.client.chat.completions.create(**{**kw, "top_logprobs": None}).choices[0].logprobs.content
    assert [e.top_logprobs for e in plain] == [[]] * len(plain)
    assert srv.client.chat.completions.create(model=model, messages=messages, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs_legacy_shape_streamed_and_raw(srv):
    kw = dict(model="demo-poet", prompt="The quick brown fox", max_tokens=8, logprobs=3, temperature=0)
    r = srv.client.completions.create(**kw)
    lp, n = r.choices[0].logprobs, r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(n)]
    prompt = srv.llm.encode("The quick brown fox")
    out = generated(srv.llm, prompt, "demo-poet", SamplingParams(max_tokens=8, logprobs=3))
    ref = log_softmax(srv.llm, prompt + out.token_ids, "demo-poet")
    for j, tok in enumerate(out.token_ids):
        row = ref[len(prompt) - 1 + j]
        assert lp.token_logprobs[j] == pytest.approx(row[tok], abs=ATOL)
        top = lp.top_logprobs[j]
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(row.max(), abs=ATOL)
        assert top[lp.tokens[j]] == pytest.approx(row[tok], abs=ATOL)  # the sampled token is among them
    # streamed: the chunks' logprobs concatenate to the whole response's
    tokens, values, offsets = [], [], []
    for chunk in srv.client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            if c.logprobs:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset
    np.testing.assert_allclose(values, lp.token_logprobs, atol=ATOL)
    # raw: at temperature 1.5 the sampled tokens' logprobs are still those of log_softmax(logits)
    hot = srv.client.completions.create(**{**kw, "temperature": 1.5, "seed": 3})
    out = generated(srv.llm, prompt, "demo-poet", SamplingParams(max_tokens=8, logprobs=3, temperature=1.5, seed=3))
    assert out.text == hot.choices[0].text
    ref = log_softmax(srv.llm, prompt + out.token_ids, "demo-poet")
    want = [ref[len(prompt) - 1 + j, t] for j, t in enumerate(out.token_ids)]
    np.testing.assert_allclose(hot.choices[0].logprobs.token_logprobs, want, atol=ATOL)


@pytest.mark.parametrize("model", ["base", "demo-coder"])
def test_echo_with_max_tokens_0_scores_the_prompt(srv, model):
    adapter = None if model == "base" else model
    text = "The capital of France is Paris"
    ids = srv.llm.encode(text)
    ref = log_softmax(srv.llm, ids, adapter)
    want = ref[np.arange(len(ids) - 1), ids[1:]]
    r = srv.client.completions.create(model=model, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert choice.text == text and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=ATOL)
    assert all(max(t.values()) == pytest.approx(ref[i].max(), abs=ATOL) for i, t in enumerate(lp.top_logprobs[1:]))
    # lm-evaluation-harness's request: token ids, echo, max_tokens 1, logprobs 1 -> the prompt's, then the new token's
    r1 = srv.client.completions.create(model=model, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp1 = r1.choices[0].logprobs
    assert len(lp1.token_logprobs) == len(ids) + 1 and lp1.token_logprobs[0] is None
    np.testing.assert_allclose(lp1.token_logprobs[1:len(ids)], want, atol=ATOL)
    assert lp1.token_logprobs[-1] == pytest.approx(ref[-1].max(), abs=ATOL)  # greedy: the most likely token
    assert r1.choices[0].text.startswith(text)
    # streamed: the prompt (with its logprobs) first, then the end
    chunks = [c.choices[0] for c in srv.client.completions.create(model=model, prompt=text, max_tokens=0, echo=True,
                                                                   logprobs=2, stream=True) if c.choices]
    assert chunks[0].text == text and chunks[-1].finish_reason == "length"
    np.testing.assert_allclose(chunks[0].logprobs.token_logprobs[1:], want, atol=ATOL)
    # echo alone
    plain = srv.client.completions.create(model=model, prompt=text, max_tokens=0, echo=True)
    assert plain.choices[0].text == text and plain.choices[0].logprobs is None


def test_python_api(srv):
    llm = srv.llm
    ids = llm.encode("abc def")
    lps = llm.prompt_logprobs(ids, "demo-pirate", top=3)
    ref = log_softmax(llm, ids, "demo-pirate")
    assert lps[0] is None and [e.token_id for e in lps[1:]] == ids[1:]
    for i, e in enumerate(lps[1:]):
        assert e.logprob == pytest.approx(ref[i, ids[i + 1]], abs=ATOL) and len(e.top) == 3
        assert [t for t, _ in e.top] == list(np.argsort(-ref[i], kind="stable")[:3])
    out = generated(llm, ids, None, SamplingParams(max_tokens=3))
    assert out.logprobs is None


def test_logprobs_errors(srv):
    with httpx.Client(base_url=srv.base, headers=srv.headers, timeout=60) as http:
        for path, body, param in [
                ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
                ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
                ("/v1/completions", {"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                 "top_logprobs"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                          "top_logprobs": 21}, "logprobs")]:
            r = http.post(path, json={"max_tokens": 2, **body})
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param, r.text
