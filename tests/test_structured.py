"""Structured output (engine/structured.py, llguidance): on a random-weight model only the constraint can make
the text valid, so every answer parsing and validating against its JSON schema shows the masks hold: enums,
booleans, bounded strings and integers, with and without an adapter, streamed and not, on both routes;
json_object; a malformed schema is a 400; rows without a constraint sample the same tokens beside
constrained rows as without them; and the masks of a step are computed while its forward runs."""
from __future__ import annotations

import json
import sys
import threading

import httpx
import jsonschema_rs
import numpy as np
import pytest

from slora_jax import LLM, InvalidRequest, SamplingParams
from slora_jax.cli import add_demo_adapters
from slora_jax.engine import structured
from tests.serving import serving

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 6},
        "count": {"type": "integer", "minimum": -5, "maximum": 300},
    },
    "required": ["color", "ok", "name", "count"],
    "additionalProperties": False,
}
ENGINE = dict(dtype="float32", kernels="xla", num_pages=96, page_rows=32, max_model_len=128, max_batch_tokens=128,
              max_running=8)


def valid(text: str, schema: dict) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return jsonschema_rs.validator_for(schema).is_valid(value)


@pytest.fixture(scope="module")
def srv():
    llm = LLM("tiny", **ENGINE)
    add_demo_adapters(llm)
    llm.warmup()
    with serving(llm) as s:
        s.llm = llm
        yield s


def texts(srv, route: str, stream: bool, **kw) -> list:
    """(text, finish_reason) of each choice."""
    if route == "chat":
        create = srv.client.chat.completions.create
        kw["messages"] = [{"role": "user", "content": "JSON?"}]
    else:
        create = srv.client.completions.create
        kw["prompt"] = "A thing, as JSON:"
        kw["extra_body"] = {"response_format": kw.pop("response_format")}  # not in the client's signature
    if not stream:
        r = create(**kw)
        return [(c.message.content if route == "chat" else c.text, c.finish_reason)
                for c in sorted(r.choices, key=lambda c: c.index)]
    out = {}
    for chunk in create(**kw, stream=True):
        for c in chunk.choices:
            text, reason = out.get(c.index, ("", None))
            piece = (c.delta.content or "") if route == "chat" else c.text
            out[c.index] = (text + piece, c.finish_reason or reason)
    return [out[i] for i in sorted(out)]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["chat", "completions"])
@pytest.mark.parametrize("model", ["base", "demo-pirate"])
def test_json_schema_holds_on_random_weights(srv, model, route, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    kw = dict(model=model, max_tokens=96, temperature=1.0, seed=11, n=3, response_format=fmt)
    got = texts(srv, route, stream, **kw)
    assert len(got) == 3
    for text, reason in got:
        assert reason == "stop" and valid(text, SCHEMA), (text, reason)
    assert len({t for t, _ in got}) > 1  # three seeds, three draws
    assert texts(srv, route, stream, **kw) == got  # seeded: the same again
    # without the constraint the same request is no JSON at all
    free = texts(srv, route, stream, **{**kw, "response_format": None})
    assert not any(valid(t, SCHEMA) for t, _ in free)


def test_greedy_json_schema_and_integer_grammar_end_by_eos_or_by_the_grammar(srv):
    for schema in (SCHEMA, {"type": "integer", "minimum": 0, "maximum": 99999}):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        for model in ("base", "demo-coder"):
            (text, reason), = texts(srv, "completions", False, model=model, max_tokens=96, temperature=0,
                                    response_format=fmt)
            assert reason == "stop" and valid(text, schema), text


def test_json_object(srv):
    """Any JSON object: unbounded, so a random model may still be inside a string when max_tokens ends it;
    then what it wrote is a prefix the grammar accepts (the tiny model's tokens are the text's bytes)."""
    stopped = 0
    for route, model in [(r, m) for r in ("chat", "completions") for m in ("base", "demo-poet")]:
        (text, reason), = texts(srv, route, False, model=model, max_tokens=96, temperature=0,
                                response_format={"type": "json_object"})
        if reason == "stop":
            stopped += 1
            assert isinstance(json.loads(text), dict), text
        else:
            assert reason == "length" and text.startswith("{")
            ids = list(text.removesuffix("\ufffd").encode("utf-8"))  # a character the limit cut in two
            matcher = srv.llm.engine.grammars.matcher(SamplingParams(json_object=True))
            assert matcher.validate_tokens(ids) == len(ids), text
    assert stopped


def test_malformed_schemas_are_400(srv):
    bad = [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strang"}}},
           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/definitions/nope"}}},
           {"type": "json_schema", "json_schema": {"name": "x"}},
           {"type": "json_schema"}]
    with httpx.Client(base_url=srv.base, headers=srv.headers, timeout=60) as http:
        for fmt in bad:
            for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                               ("/v1/completions", {"prompt": "x"})):
                r = http.post(path, json={**body, "max_tokens": 4, "response_format": fmt})
                assert r.status_code == 400, (fmt, r.text)
                assert r.json()["error"]["param"] == "response_format", r.text
    with pytest.raises(InvalidRequest):
        srv.llm.submit("x", sampling=SamplingParams(json_schema={"type": "strang"}))
    with pytest.raises(InvalidRequest):
        SamplingParams(json_schema="{not json")
    assert srv.llm.stats()["requests_waiting"] == 0  # refused before it was queued


def _run(eng, specs) -> list:
    reqs = [eng.add_request(p, a, sp) for p, a, sp in specs]
    eng.run_until_done(reqs)
    return reqs


def test_unconstrained_rows_are_unchanged_by_constrained_neighbours():
    llm = LLM("tiny", **ENGINE)
    add_demo_adapters(llm)
    eng = llm.engine
    free = [([256, 72, 105], None, SamplingParams(max_tokens=20, ignore_eos=True)),
            ([256, 65, 66, 67], "demo-pirate", SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.9, seed=5)),
            ([256, 10, 11], "demo-poet", SamplingParams(max_tokens=20, ignore_eos=True, temperature=1.0, top_k=20,
                                                        seed=9))]
    others = [([256, 40, 41], None), ([256, 50], "demo-pirate")]
    constrained = [(p, a, SamplingParams(max_tokens=96, json_schema=SCHEMA, temperature=t, seed=1))
                   for (p, a), t in zip(others, (0.0, 1.0))]
    plain = [(p, a, SamplingParams(max_tokens=96, temperature=t, seed=1)) for (p, a), t in zip(others, (0.0, 1.0))]
    alone = [r.output_ids for r in _run(eng, free + plain)[:3]]
    mixed = _run(eng, free + constrained)
    assert [r.output_ids for r in mixed[:3]] == alone
    for r in mixed[3:]:
        assert r.finish_reason == "stop" and valid(r.text, SCHEMA), r.text
    assert llm.stats()["pages_kv"] == 0


def test_masks_are_computed_while_the_forward_runs():
    """Async loop, a constrained batch: forward N+1 is dispatched before step N's tokens are read; N+1's
    masks are computed after that read, on a worker thread, while the host builds step N+2; N+1's sampling
    is dispatched once N+2's batch is built, just before N+2's forward that takes its tokens."""
    llm = LLM("tiny", **ENGINE)
    eng = llm.engine
    log, mask_threads = [], set()

    def logged(name, fn):
        def call(*a, **kw):
            log.append(name)
            return fn(*a, **kw)
        return call

    real_sample, real_masks = eng.runner.sample, eng.grammars.masks

    def sample(fwd, mask=None, logprobs=False):
        log.append("sample" if mask is not None else "sample-unmasked")
        return real_sample(fwd, mask, logprobs)

    def masks(rows, b):
        mask_threads.add(threading.current_thread().name)
        out = real_masks(rows, b)
        log.append("masks-done")
        return out

    eng.runner.forward = logged("forward", eng.runner.forward)
    eng.builder.build = logged("build", eng.builder.build)
    eng._read = logged("read", eng._read)
    eng.runner.sample, eng.grammars.masks = sample, masks
    reqs = _run(eng, [([256, 1, 2], None, SamplingParams(max_tokens=96, json_schema=SCHEMA))] * 2)
    assert all(valid(r.text, SCHEMA) for r in reqs)
    assert mask_threads and threading.current_thread().name not in mask_threads
    steps = log.count("forward")
    assert steps >= 10 and log.count("masks-done") == log.count("sample") == steps
    main = [e for e in log if e != "masks-done"]
    assert main[:3] == ["build", "forward", "build"]  # the first step: nothing in flight to read
    forwards = [j for j, e in enumerate(main) if e == "forward"]
    for i in forwards[1:-1]:  # build N+2, sample N+1, forward N+2, read N+1
        assert main[i - 2: i + 2] == ["build", "sample", "forward", "read"], main[i - 2: i + 2]
    for k, i in enumerate(j for j, e in enumerate(log) if e == "sample"):  # each step's masks were done first
        assert log[:i].count("masks-done") == k + 1
    # the worker gets the GIL to start and return within the lowered switch interval, not CPython's 5 ms
    assert sys.getswitchinterval() <= structured.SWITCH_INTERVAL_S < 0.005


def test_a_grammar_refusing_a_token_fails_only_its_request():
    llm = LLM("tiny", **ENGINE)
    eng = llm.engine
    eng.grammars.masks = lambda rows, b: np.full((b, eng.grammars.words), -1, np.int32)  # masks lost: anything goes
    free = eng.add_request([256, 3], None, SamplingParams(max_tokens=8, ignore_eos=True))
    req = eng.add_request([256, 4], None, SamplingParams(max_tokens=96, json_object=True))
    eng.run_until_done([free, req])
    assert req.finish_reason == "error" and "grammar" in req.error
    assert free.finish_reason == "length" and len(free.output_ids) == 8 and llm.stats()["pages_kv"] == 0


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_json_schema_with_hf_tokenizers(tmp_path, kind):
    """A byte-level BPE and a SentencePiece-style (byte fallback) tokenizer: llguidance reads the model dir's
    tokenizer.json, and the text, decoded as transformers decodes it, is valid."""
    from tests import hf_fixtures
    from tests.test_hf_fidelity import byte_level_bpe, save_tokenizer, sentencepiece_style

    tok = byte_level_bpe() if kind == "bpe" else sentencepiece_style()
    specials = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>") if kind == "bpe" else \
        dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    save_tokenizer(tok, tmp_path, **specials)
    bos, eos = tok.token_to_id(specials["bos_token"]), tok.token_to_id(specials["eos_token"])
    hf_fixtures.save_tiny_llama(tmp_path, vocab_size=tok.get_vocab_size() + 3,  # rows past the tokenizer's ids
                                bos_token_id=bos, eos_token_id=eos)
    llm = LLM(str(tmp_path), **{**ENGINE, "num_pages": 64, "page_rows": 16})
    sps = [SamplingParams(max_tokens=96, json_schema=SCHEMA, temperature=t, seed=s) for t, s in ((0.0, 0), (1.0, 1),
                                                                                              (1.0, 2))]
    for sp in sps:
        out = llm.generate("Some JSON:", sampling=sp)[0]
        assert out.finish_reason == "stop" and valid(out.text, SCHEMA), out.text
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
        assert max(out.token_ids) < tok.get_vocab_size()


def test_constrained_rows_through_preemptions_and_both_loops():
    """Seeded constrained requests (and logprobs) beside free ones, a pool too small for all of them: the same
    tokens from the one-step-behind loop and the synchronous one, preempted requests resuming their grammar."""
    from tests.test_engine import add_adapters, make_llm, workload

    prompts, adapters = workload(24, 6, seed=5, max_prompt=20)
    small = {**SCHEMA, "properties": {**SCHEMA["properties"], "name": {"type": "string", "maxLength": 3}}}
    sps = [SamplingParams(max_tokens=60, json_schema=small, temperature=0.8, seed=i, logprobs=2) if i % 2 else
           SamplingParams(max_tokens=12, temperature=0.8, seed=i, ignore_eos=True) for i in range(len(prompts))]
    outs = {}
    for mode in (False, True):
        llm = make_llm(num_pages=100, max_batch_tokens=64, async_steps=mode)
        add_adapters(llm, 6)
        reqs = [llm.engine.add_request(p, a, sp) for p, a, sp in zip(prompts, adapters, sps)]
        llm.engine.run_until_done(reqs)
        st = llm.stats()
        assert st["pages_kv"] == 0 and st["preemptions"] > 0, st
        for r in reqs[1::2]:
            assert r.finish_reason == "stop" and valid(r.text, small), r.text
            assert [e.token_id for e in r.logprobs] == r.output_ids
        outs[mode] = [(r.output_ids, [round(e.logprob, 4) for e in r.logprobs or ()]) for r in reqs]
    assert outs[True] == outs[False]


def test_no_compile_after_warmup_for_structured_output_and_logprobs():
    llm = LLM("tiny", **ENGINE)
    llm.warmup()
    compiled = llm.engine.runner.cache_size()
    sps = [SamplingParams(max_tokens=40, json_schema=SCHEMA), SamplingParams(max_tokens=40, json_object=True,
                                                                             temperature=1.0, seed=3),
           SamplingParams(max_tokens=6, logprobs=4, ignore_eos=True), SamplingParams(max_tokens=6, ignore_eos=True)]
    for n in (1, 3, 6):  # batches of several buckets
        outs = llm.generate([[256, 7 + i] for i in range(n)], sampling=sps[n % len(sps)])
        assert all(o.finish_reason in ("stop", "length") for o in outs)
        for sp in sps:
            llm.generate([[256, 9 + i] for i in range(n)], sampling=sp)
    assert llm.engine.runner.cache_size() == compiled
