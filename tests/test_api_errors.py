"""The public `LLM` facade and its typed errors: what each refusal raises, what HTTP status it becomes
(server/errors.py's one table), the defaults read from a model dir, and the CLI's one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import slora_jax
from server.errors import STATUS, ApiError
from server.launch import main as slora_jax_main
from slora_jax import (LLM, AdapterError, AdapterExists, AdapterInUse, AdapterNotFound, CapacityError, ConfigError,
                       InvalidAdapter, InvalidRequest, RequestError, RequestTooLong, SamplingParams, SloraError)
from slora_jax.cli import main as lib_main
from slora_jax.config import CONFIGS_DIR, load_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", kernels="xla", num_pages=24, page_rows=16, max_model_len=64, max_running=4, max_batch_tokens=64)


def lora(cfg, rank: int, modules=("q_proj", "v_proj"), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {f"{layer}.{m}": (rng.normal(0, 0.05, (cfg.module_shape(m)[0], rank)),
                             rng.normal(0, 0.05, (rank, cfg.module_shape(m)[1])))
            for layer in range(cfg.num_layers) for m in modules}


# -- the table -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("error,status,code", [
    (AdapterNotFound, 404, "model_not_found"), (AdapterExists, 409, "adapter_exists"),
    (AdapterInUse, 409, "adapter_in_use"), (InvalidAdapter, 400, "invalid_adapter"), (AdapterError, 400, None),
    (RequestTooLong, 400, "context_length_exceeded"), (InvalidRequest, 400, None), (RequestError, 400, None),
    (CapacityError, 503, "insufficient_capacity"), (ConfigError, 500, None), (SloraError, 500, None),
])
def test_each_error_type_has_one_status(error, status, code):
    e = ApiError.of(error("what went wrong", "field"))
    assert (e.status, e.code, e.message, e.param) == (status, code, "what went wrong", "field")


def test_every_public_error_type_is_in_the_table():
    public = {getattr(slora_jax.errors, n) for n in slora_jax.errors.__all__}
    assert public == set(STATUS)
    assert issubclass(AdapterNotFound, KeyError) and issubclass(InvalidRequest, ValueError)
    assert str(AdapterNotFound("adapter 'x' is not registered")) == "adapter 'x' is not registered"  # not quoted


# -- what the facade raises --------------------------------------------------------------------------------
def test_adapter_refusals_are_typed(llm, tmp_path):
    cfg = llm.model_cfg
    llm.add_adapter("a", lora(cfg, 4))
    assert llm.has_adapter("a") and llm.adapter("a")["max_rank"] == 4
    with pytest.raises(AdapterExists):
        llm.load_adapter("a", str(tmp_path / "not-even-read"))
    with pytest.raises(AdapterExists):
        llm.add_adapter("a", lora(cfg, 4))
    with pytest.raises(AdapterNotFound):
        llm.remove_adapter("nope")
    with pytest.raises(AdapterNotFound):
        llm.adapter("nope")
    with pytest.raises(InvalidAdapter, match="not a directory"):
        llm.load_adapter("b", str(tmp_path / "missing"))
    with pytest.raises(InvalidAdapter, match="rank 9, above max_rank=8"):
        LLM("tiny", kernels="xla", max_rank=8, num_pages=24, max_model_len=64).add_adapter("c", lora(cfg, 9))
    small = LLM("tiny", kernels="xla", num_pages=6, page_rows=16, max_model_len=64)  # 2 pages beside one sequence
    with pytest.raises(CapacityError, match="pool pages"):
        small.add_adapter("huge", lora(cfg, 16, modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj")))
    assert not small.has_adapter("huge")

    handle = llm.submit([256, 1, 2], adapter="a", sampling=SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(AdapterInUse, match="in use by 1 request"):
        llm.remove_adapter("a")
    llm.engine.run_until_done([handle._req])
    assert handle.finished and handle.finish_reason == "length" and handle.num_output_tokens == 4
    llm.remove_adapter("a")
    assert not llm.has_adapter("a")


def test_request_refusals_are_typed_and_name_the_field(llm):
    with pytest.raises(RequestTooLong) as e:
        llm.submit([256] + [1] * 63)
    assert e.value.param == "prompt" and "max_model_len is 64" in str(e.value)
    with pytest.raises(RequestTooLong) as e:
        llm.check_request([256] + [1] * 40, SamplingParams(max_tokens=30))
    assert e.value.param == "max_tokens" and "71 tokens (41 in the prompt, 30 in the completion)" in str(e.value)
    with pytest.raises(InvalidRequest) as e:
        llm.submit([256, 99999])
    assert e.value.param == "prompt" and "outside the vocabulary" in str(e.value)
    with pytest.raises(InvalidRequest) as e:
        llm.submit([])
    assert e.value.param == "prompt"
    for field, value in (("temperature", -1.0), ("top_p", 0.0), ("top_k", -1), ("max_tokens", 0)):
        with pytest.raises(InvalidRequest) as e:
            SamplingParams(**{field: value})
        assert e.value.param == field
    with pytest.raises(AdapterNotFound) as e:
        llm.submit("hi", adapter="nope", sampling=SamplingParams(max_tokens=4))
    assert e.value.param == "model"
    assert llm.check_request("hi", SamplingParams(max_tokens=4)) == llm.encode("hi")
    assert llm.stats()["pages_kv"] == 0 and llm.stats()["requests_waiting"] == 0  # nothing half-queued


def test_submit_stream_abort_and_the_background_loop(llm):
    deltas, done = [], threading.Event()

    def on_update(handle, delta):
        deltas.append(delta)
        if handle.finished:
            done.set()

    assert not llm.is_running
    llm.start()
    try:
        assert llm.is_running
        h = llm.submit("hello", sampling=SamplingParams(max_tokens=6, ignore_eos=True), on_update=on_update)
        assert done.wait(120) and h.finish_reason == "length" and h.ttft_s is not None and h.latency_s >= h.ttft_s
        out = h.output()
        assert "".join(deltas) == out.text == llm.decode(out.token_ids) and len(out.token_ids) == 6
        assert out.text == "".join(llm.stream("hello", sampling=SamplingParams(max_tokens=6, ignore_eos=True)))

        long = llm.submit("x", sampling=SamplingParams(max_tokens=50, ignore_eos=True))
        long.abort()
        assert long.finished and long.finish_reason == "abort"
    finally:
        llm.stop()
    assert not llm.is_running and llm.stats()["pages_kv"] == 0


def test_chat_templates(llm, tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    assert llm.apply_chat_template(msgs) == llm.encode("<|user|>\nhi\n<|assistant|>\n")  # the byte model's format
    templated = LLM("tiny", kernels="xla", num_pages=24, max_model_len=64,
                    chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                                  "{% if add_generation_prompt %}[assistant] {% endif %}")
    assert templated.apply_chat_template(msgs) == templated.encode("[user] hi\n[assistant] ", add_bos=False)
    with pytest.raises(ConfigError, match="not a valid jinja template"):
        LLM("tiny", kernels="xla", num_pages=24, max_model_len=64, chat_template="{% for %}")


# -- defaults from the model dir ----------------------------------------------------------------------------
def test_generation_config_eos_ids_join_config_json(tmp_path):
    with open(os.path.join(CONFIGS_DIR, "tiny.json")) as f:
        cfg = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 257}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 300]}))
    assert load_model_config(str(tmp_path))[0].eos_token_ids == (257, 300)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 301}))
    assert load_model_config(str(tmp_path))[0].eos_token_ids == (257, 301)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ConfigError, match="eos_token_id must be"):
        load_model_config(str(tmp_path))


def test_max_model_len_defaults_to_max_position_embeddings_capped_by_the_pool(tmp_path):
    with open(os.path.join(CONFIGS_DIR, "tiny.json")) as f:
        cfg = json.load(f)
    cfg["engine"] = {k: v for k, v in cfg["engine"].items() if k not in ("max_model_len", "num_pages")}
    path = tmp_path / "tiny-nolimit.json"
    path.write_text(json.dumps(cfg))
    assert LLM(str(path), kernels="xla").max_model_len == cfg["max_position_embeddings"] == 1024
    assert LLM(str(path), kernels="xla", num_pages=20, page_rows=16).max_model_len == 19 * 16  # one page spare
    assert LLM(str(path), kernels="xla", max_model_len=100).max_model_len == 100
    assert LLM(str(path), kernels="xla").engine_cfg.dtype == "float32"  # on CPU


# -- the command line -----------------------------------------------------------------------------------------
def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("20")]  # log lines
    assert len(err) == 1 and err[0].startswith("slora-jax: error: "), err
    return err[0]


def test_cli_errors_are_one_line_and_exit_nonzero(capsys, tmp_path):
    assert lib_main(["generate", "--prompt", "Hi", "--use", "nope", "--kernels", "xla", "--max-model-len", "64",
                     "--num-pages", "24"]) == 1
    assert "no adapter named 'nope'" in one_line_error(capsys)
    assert slora_jax_main(["serve", "--model", "no-such-model"]) == 1
    assert "no model directory or config preset named 'no-such-model'" in one_line_error(capsys)
    assert slora_jax_main(["serve", "--chat-template", str(tmp_path / "missing.jinja")]) == 1
    assert "--chat-template" in one_line_error(capsys)
    assert slora_jax_main(["serve", "--adapter-dir", str(tmp_path / "missing")]) == 1
    assert "--adapter-dir" in one_line_error(capsys)
    assert slora_jax_main(["generate", "--prompt", "Hi", "--adapter", "no-equals-sign"]) == 1
    assert "NAME=PATH" in one_line_error(capsys)


def test_python_dash_m_server_runs_serve():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "server", "--model", "no-such-model"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("slora-jax: error: no model directory")
    p = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "--served-model-name" in p.stdout and "--chat-template" in p.stdout
