"""Tensor parallelism: sharded outputs equal single-device ones in both adapter layouts (lora_tp), LoRA
adds no collective to the step under lora_tp="replicated" (activation-sized ones under "sharded"),
adapter rows are packed so each device holds what it uses, and impossible splits are refused.

The sharded checks need several devices. On CPU that takes XLA_FLAGS=--xla_force_host_platform_device_count=8
before jax starts, so when this process has fewer devices, one test reruns this file in a subprocess that
has them (the rest of the suite keeps its single device).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax import LLM, SamplingParams
from slora_jax.config import LORA_MODULES, LORA_TP, ConfigError, EngineConfig, ModelConfig, load_model_config
from slora_jax.memory import layout
from slora_jax.memory.pool import _scatter_rows
from slora_jax.model.weights import random_model, restore_params, save_params
from slora_jax.parallel import COLUMN_PARALLEL, check_tp, lora_widths, make_mesh, param_spec
from tests import tp_worker
from tests.mixed_batch import mixed_prefill_logits

N_DEV = 8
multi = pytest.mark.skipif(jax.device_count() < N_DEV, reason=f"needs {N_DEV} devices (run in the subprocess)")

# GQA with enough heads for tp=8: 16 query heads, 8 kv heads of 8 dims (W = 64, 8 columns per device)
TP_MODEL = {"name": "tiny-tp", "model_type": "llama", "vocab_size": 320, "hidden_size": 128,
            "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "bos_token_id": 256,
            "eos_token_id": 257}
# 320 pages: at tp=8 the replicated layout gives each device 8 pool columns, and a whole 128-wide row
# takes 16 pool rows (4.3x the sharded layout's rows for these adapters)
ENGINE = dict(dtype="float32", kernels="xla", max_rank=8, num_pages=320, page_rows=4, max_model_len=64,
              max_running=8, max_batch_tokens=64)
ALL = tuple(LORA_MODULES)
ADAPTERS = {"qvo_r2": (2, ("q_proj", "v_proj", "o_proj")), "all_r8": (8, ALL), "mlp_r5": (5, ("up_proj", "down_proj")),
            "kv_r3": (3, ("k_proj", "v_proj", "gate_proj"))}
TOKENS = [1, 17, 5, 99, 42, 3, 64, 7, 120, 33, 8, 15, 77]
# one mixed batch: every adapter, two rows of one adapter, base rows; rows 0 and 6 differ only by adapter
ROWS = [(TOKENS[:7], "qvo_r2"), (TOKENS[3:12], None), (TOKENS[:5], "all_r8"), (TOKENS[2:11], "mlp_r5"),
        (TOKENS[1:4], "qvo_r2"), (TOKENS[4:13], "kv_r3"), (TOKENS[:7], None), (TOKENS[:5], "kv_r3")]


def cfg() -> ModelConfig:
    return ModelConfig.from_hf_dict(TP_MODEL, name="tiny-tp")


def random_lora(c: ModelConfig, rank: int, modules, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {f"{layer}.{m}": (rng.normal(0, 0.1, (c.module_shape(m)[0], rank)),
                             rng.normal(0, 0.1, (rank, c.module_shape(m)[1])))
            for layer in range(c.num_layers) for m in modules}


# -- single process ---------------------------------------------------------------------------------------

def test_tp_must_divide_heads():
    with pytest.raises(ConfigError, match=r"tp=3 must divide num_heads=4, num_kv_heads=2"):
        LLM("tiny", tp=3)
    with pytest.raises(ConfigError, match=r"num_kv_heads=2.*valid tp here: \[1, 2\]"):
        LLM("tiny", tp=4)
    with pytest.raises(ConfigError, match="positive"):
        LLM("tiny", tp=0)
    with pytest.raises(ConfigError, match="intermediate_size=250"):
        check_tp(ModelConfig.from_hf_dict({**TP_MODEL, "intermediate_size": 250}), 4)


def test_too_few_devices_is_refused():
    with pytest.raises(ConfigError, match="tp=2 needs 2 devices but only 1"):
        make_mesh(cfg(), 2, jax.devices()[:1])


def test_lora_tp_must_be_known():
    with pytest.raises(ConfigError, match=r"lora_tp must be one of \['replicated', 'sharded'\]"):
        EngineConfig(lora_tp="split")
    with pytest.raises(ConfigError, match="lora_tp"):
        LLM("tiny", lora_tp="both")


@pytest.mark.parametrize("lora_tp", LORA_TP)
@pytest.mark.parametrize("tp", [1, 2, 8])
def test_pack_puts_what_each_device_uses_first_in_its_columns(tp, lora_tp):
    """Device d's columns of a matrix row's K pool rows, read in order, start with what device d uses of
    the row, then zeros: the d-th 1/tp of a half split like the base weight (A^T rows: its input features;
    B rows: its output columns), the whole row of a half every device holds whole ("replicated": A of the
    column-parallel modules, B of the row-parallel ones); tp=1 is the plain layout in both."""
    c = cfg()
    ranks = {"q_proj": 3, "down_proj": 2, "gate_proj": 4, "o_proj": 1}
    rng = np.random.default_rng(1)
    mods = {m: tuple(rng.normal(size=(c.num_layers, *shape)).astype(np.float32)
                     for shape in ((c.module_shape(m)[0], r), (r, c.module_shape(m)[1]))) for m, r in ranks.items()}
    packed = layout.pack(c, mods, np.float32, tp, lora_tp)
    assert packed.shape == (c.num_layers, layout.num_rows(c, ranks, tp, lora_tp), c.kv_size)
    if tp == 1:
        np.testing.assert_array_equal(packed, layout.pack(c, mods, np.float32))
    rows_per_module = layout.all_module_rows(c, tp, lora_tp)
    tables = layout.module_tables(rows_per_module, ranks, np.arange(packed.shape[1]))
    lw = c.kv_size // tp
    for m, (a_rows, b_rows) in tables.items():
        a, b = mods[m]
        halves = ((a_rows, np.swapaxes(a, 1, 2)), (b_rows, b))  # [r, K] pool rows, [L, r, D]
        for (rows, mat), d_loc in zip(halves, lora_widths(c, m, tp, lora_tp)):
            d = mat.shape[2]
            whole = lora_tp == "replicated" and (rows is a_rows) == (m in COLUMN_PARALLEL)
            assert d_loc == (d if whole or tp == 1 else d // tp)
            assert rows.shape[1] == -(-d_loc // lw)  # K = ceil(what the device holds / its columns)
            for dev in range(tp):
                local = packed[:, rows, dev * lw:(dev + 1) * lw].reshape(c.num_layers, len(rows), -1)
                want = mat if whole else mat[..., dev * d_loc:(dev + 1) * d_loc]
                np.testing.assert_array_equal(local[..., :d_loc], want)
                assert not local[..., d_loc:].any()


def test_replicated_rows_per_device_on_llama3_8b():
    """Llama-3-8B's pool rows are W = 8 * 128 = 1024 wide, so at tp=8 each device holds 128 columns and a
    whole 4096-wide A^T row (q, k, v, gate, up) takes 32 pool rows; a split one the single device's 4."""
    c, _ = load_model_config("llama3-8b")
    assert layout.module_rows(c, "q_proj", 8, "replicated") == (32, 4)  # A whole, B = 4096/8 of q's columns
    assert layout.module_rows(c, "k_proj", 8, "replicated") == (32, 1)  # B: 1024/8 = 128, one pool row
    assert layout.module_rows(c, "down_proj", 8, "replicated") == (14, 32)  # A = 14336/8 rows, B whole
    assert layout.module_rows(c, "q_proj", 8, "sharded") == layout.module_rows(c, "q_proj") == (4, 4)
    assert layout.num_rows(c, {"q_proj": 8}, 8, "replicated") == 8 * 36


# -- several devices ----------------------------------------------------------------------------------------

def test_sharded_checks_run_on_8_cpu_devices():
    """Runs this file's multi-device tests in a child process that has 8 CPU devices."""
    if jax.device_count() >= N_DEV:
        pytest.skip("this process has the devices: the tests below run here")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={N_DEV}"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
           "-k", "not run_on_8 and not processes"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    assert "skipped" not in r.stdout.splitlines()[-1], tail


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "tiny-tp.json"
    path.write_text(json.dumps(TP_MODEL))
    return str(path)


_LLMS: dict = {}


def llm_tp(model_file, tp: int, lora_tp: str = "replicated") -> LLM:
    """One LLM per (tp, lora_tp) for the module, all with the same weights (seed) and adapters."""
    key = (tp, lora_tp if tp > 1 else "replicated")  # one device: both layouts are the plain one
    if key not in _LLMS:
        llm = LLM(model_file, tp=tp, lora_tp=key[1], **ENGINE)
        for i, (name, (r, mods)) in enumerate(ADAPTERS.items()):
            llm.add_adapter(name, random_lora(llm.model_cfg, r, mods, seed=10 + i), alpha=2.0 * r)
        _LLMS[key] = llm
    return _LLMS[key]


_REF: dict = {}


def ref_logits(model_file) -> np.ndarray:
    if "mixed" not in _REF:
        _REF["mixed"] = mixed_prefill_logits(llm_tp(model_file, 1), ROWS)[0]
        assert np.abs(_REF["mixed"][0] - _REF["mixed"][6]).max() > 1e-2, "the adapters must change the logits"
    return _REF["mixed"]


@multi
@pytest.mark.parametrize("lora_tp", LORA_TP)
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_sharded_outputs_equal_single_device(model_file, tp, lora_tp):
    """A mixed prefill batch's logits, then greedy generation (prefill and decode steps), per row."""
    ref, llm = llm_tp(model_file, 1), llm_tp(model_file, tp, lora_tp)
    np.testing.assert_allclose(mixed_prefill_logits(llm, ROWS)[0], ref_logits(model_file), rtol=1e-4, atol=1e-5)
    # greedy generation of a mixed batch: prefill then decode steps through the sharded pool
    prompts, adapters = [t for t, _ in ROWS], [a for _, a in ROWS]
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    if "greedy" not in _REF:
        _REF["greedy"] = [o.token_ids for o in ref.generate(prompts, adapter=adapters, sampling=sp)]
    assert [o.token_ids for o in llm.generate(prompts, adapter=adapters, sampling=sp)] == _REF["greedy"]
    hits = llm.stats()["prefix_hit_tokens"]  # again: full pages now come from the prefix cache, sharded like the pool
    assert [o.token_ids for o in llm.generate(prompts, adapter=adapters, sampling=sp)] == _REF["greedy"]
    assert llm.stats()["prefix_hit_tokens"] > hits
    sh = llm.engine.pool.array.sharding
    assert sh.spec == jax.sharding.PartitionSpec(None, None, "tp") and len(sh.device_set) == tp
    llm.engine.pages.check_invariants()


@multi
def test_params_and_pool_are_placed_sharded(model_file):
    llm = llm_tp(model_file, 4)
    c, eng = llm.model_cfg, llm.engine
    layer0 = eng.runner.state["layers"][0]
    assert layer0["q_proj"][...].sharding.shard_shape((c.hidden_size, c.q_size)) == (c.hidden_size, c.q_size // 4)
    assert layer0["down_proj"][...].sharding.shard_shape(layer0["down_proj"][...].shape) == \
        (c.intermediate_size // 4, c.hidden_size)
    pool = eng.pool.array
    assert {s.data.shape for s in pool.addressable_shards} == {(c.num_layers, pool.shape[1], c.kv_size // 4)}


def _collectives(hlo: str) -> list:
    """(op, [shape, ...]) of every cross-device op in compiled HLO text."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                      r"collective-broadcast|ragged-all-to-all)(-start)?\(", line)
        if m:
            shapes = [tuple(int(d) for d in s.split(",") if d) for s in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
            out.append((m.group(2), shapes))
    return out


@multi
@pytest.mark.parametrize("lora_tp", LORA_TP)
def test_lora_collectives(model_file, lora_tp):
    """The compiled step at tp=4 with LoRA on all seven modules. The base model has one [T, hidden]
    all-reduce after each row-parallel linear; "replicated" adds no collective to it, "sharded" one
    [M, T, R] all-reduce per LoRA shrink (M modules sharing the input). Nothing the size of a weight or a
    page moves, a swap-in (the pool scatter) moves nothing between devices, and the pool is never copied."""
    tp = 4
    llm = llm_tp(model_file, tp, lora_tp)
    c, eng = llm.model_cfg, llm.engine
    h, r = c.hidden_size, eng.ecfg.max_rank
    assert eng.store.target_modules() == ALL

    def compiled(inp, samp) -> str:
        return eng.runner.lower(eng.pool.array, inp, samp).compile().as_text()

    for decode, size in ((True, 8), (False, 64)):  # the buckets generation used: compiled already
        inp, samp = eng.builder.dummy(decode, size, True)
        base_inp, _ = eng.builder.dummy(decode, size, False)
        assert inp.lora.modules == ALL and base_inp.lora is None
        t = len(inp.tokens)
        base = _collectives(compiled(base_inp, samp))
        assert {op for op, _ in base} == {"all-reduce"}, base
        assert [s for _, ss in base for s in ss] == [(t, h)] * (2 * c.num_layers), base  # after o and down
        hlo = compiled(inp, samp)
        found = _collectives(hlo)
        if lora_tp == "replicated":
            assert found == base  # the same ops with the same shapes
        else:
            assert {op for op, _ in found} == {"all-reduce"}, found
            shapes = [s for _, ss in found for s in ss]
            assert set(shapes) <= {(t, h), (t, r), (2, t, r), (3, t, r)}, shapes
            assert shapes.count((t, h)) == 2 * c.num_layers
            assert len(shapes) == 6 * c.num_layers  # and one per LoRA shrink: qkv, o, gate/up, down
        # the donated pool is updated in place on every device: aliased, never copied
        local = "f32[{},{},{}]{{".format(c.num_layers, eng.pool.shape[1], c.kv_size // tp)
        assert "input_output_alias" in hlo and local in hlo
        assert not [ln for ln in hlo.splitlines() if local in ln and re.search(r"\bcopy(-start)?\(", ln)]
    if lora_tp == "sharded":  # adapters on attention only (S-LoRA's q,k,v,o): no LoRA all-reduce for the MLP
        attn_only = dataclasses.replace(inp.lora, modules=("q_proj", "k_proj", "v_proj", "o_proj"))
        shapes = [s for _, ss in _collectives(compiled(dataclasses.replace(inp, lora=attn_only), samp)) for s in ss]
        assert shapes.count((t, h)) == 2 * c.num_layers and len(shapes) == 4 * c.num_layers, shapes
    # a swap-in: each device's columns of the host buffer go to that device, and the scatter is local
    data = jax.device_put(np.zeros((c.num_layers, 16, c.kv_size), np.float32), eng.pool.array.sharding)
    hlo = _scatter_rows.lower(eng.pool.array, jnp.zeros(16, jnp.int32), data).compile().as_text()
    assert _collectives(hlo) == []


@multi
@pytest.mark.parametrize("lora_tp", LORA_TP)
def test_pool_stays_sharded_through_swaps(model_file, lora_tp):
    """Evicting and re-loading adapters (donated scatters into the sharded pool) keeps outputs right."""
    llm = llm_tp(model_file, 2, lora_tp)
    swaps = llm.stats()["swaps_in"]
    for name in ADAPTERS:
        llm.engine.cache.evict(name)
    np.testing.assert_allclose(mixed_prefill_logits(llm, ROWS)[0], ref_logits(model_file), rtol=1e-4, atol=1e-5)
    assert llm.engine.pool.array.sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")
    assert llm.stats()["swaps_in"] == swaps + len(ADAPTERS)


@multi
def test_checkpoints_load_straight_into_shards(hf_models, tmp_path):
    """HF safetensors and orbax checkpoints land in their shards and give the single-device logits."""
    kw = dict(dtype="float32", kernels="xla", num_pages=32, page_rows=4, max_model_len=32, max_running=4,
              max_batch_tokens=32)
    spec = jax.sharding.PartitionSpec
    hf = hf_models["mha"]  # 4 heads, 4 kv heads
    llm = LLM(hf, tp=4, **kw)
    layer = llm.engine.runner.state["layers"][1]
    assert layer["k_proj"][...].sharding.spec == spec(None, "tp")
    assert layer["o_proj"][...].sharding.spec == spec("tp", None)
    np.testing.assert_allclose(llm.logits(TOKENS), LLM(hf, **kw).logits(TOKENS), rtol=1e-4, atol=1e-5)

    c, _ = load_model_config("tiny")
    model = random_model(c, np.float32, seed=3)
    save_params(model, str(tmp_path / "ckpt"))
    restored = restore_params(str(tmp_path / "ckpt"), c, np.float32, make_mesh(c, 2))
    for name in ("up_proj", "o_proj", "input_norm"):
        got = getattr(restored.layers[0], name)[...]
        assert got.sharding.spec == param_spec([name]) and len(got.sharding.device_set) == 2
        np.testing.assert_array_equal(np.asarray(got), np.asarray(getattr(model.layers[0], name)[...]))


@multi
@pytest.mark.parametrize("lora_tp", LORA_TP)
def test_pallas_kernels_inside_shard_map(model_file, lora_tp):
    """The Pallas kernels (interpret mode on CPU) on each device's slice give the reference's logits."""
    kw = {**ENGINE, "num_pages": 64, "max_model_len": 32, "max_running": 4, "max_batch_tokens": 16}
    ref = LLM("tiny", **{**kw, "kernels": "xla"})  # head_dim 32: the Pallas kernels need >= 16
    llm = LLM("tiny", tp=2, lora_tp=lora_tp, **{**kw, "kernels": "pallas"})
    lora = random_lora(ref.model_cfg, 8, ALL, seed=5)
    for m in (ref, llm):
        m.add_adapter("all_r8", lora)
    np.testing.assert_allclose(llm.logits(TOKENS[:6], adapter="all_r8"), ref.logits(TOKENS[:6], adapter="all_r8"),
                               rtol=1e-4, atol=1e-5)


def test_tp_across_processes(model_file):
    """Two jax.distributed CPU processes, one device each, tp=2 spanning both (the multi-host set-up):
    both get the single-process logits and tokens (sampled with seeds drawn alike in both)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.tp_worker", model_file, "2", str(i), str(port)], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    ref = tp_worker.run(model_file, 1)  # here: one device, no distributed runtime
    for res in results:
        np.testing.assert_allclose(res["logits"], ref["logits"], rtol=1e-4, atol=1e-5)
        assert res["greedy"] == ref["greedy"]
    assert results[0]["sampled"] == results[1]["sampled"]  # unseeded: seeds drawn alike in both processes


@multi
def test_pinned_buffers_split_like_the_pool(model_file):
    """On GPU an adapter's host buffer is pinned split like the pool, so a swap-in is one host->device
    copy per device (CPU has no pinned memory of its own; this runs the same moves on CPU)."""
    from slora_jax.adapters.store import to_device
    from slora_jax.parallel import pool_sharding, put

    sharding = pool_sharding(make_mesh(cfg(), 4))
    host = np.arange(2 * 8 * 64, dtype=np.float32).reshape(2, 8, 64)
    pinned = put(host, sharding.with_memory_kind("pinned_host"))
    moved = to_device(pinned, sharding)
    assert moved.sharding == sharding and moved.sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(moved), host)


@multi
def test_structured_output_and_logprobs_sharded(model_file):
    """A constrained batch (masks applied to replicated logits) with log-probabilities, mixed with free rows:
    the same tokens and log-probabilities on tp=4 as on one device."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    outs = {}
    for tp in (1, 4):
        eng = llm_tp(model_file, tp).engine
        reqs = [eng.add_request(TOKENS[:5], "qvo_r2", SamplingParams(max_tokens=40, json_schema=schema, logprobs=3,
                                                                     temperature=0.8, seed=2)),
                eng.add_request(TOKENS[2:9], None, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)),
                eng.add_request(TOKENS[1:4], "all_r8", SamplingParams(max_tokens=40, json_object=True))]
        eng.run_until_done(reqs)
        outs[tp] = [(r.output_ids, [(e.token_id, e.logprob, e.top) for e in r.logprobs or ()]) for r in reqs]
        assert reqs[0].finish_reason == "stop" and set(json.loads(reqs[0].text)) == {"ok", "n"}
    for (ids1, lp1), (ids4, lp4) in zip(outs[1], outs[4]):
        assert ids1 == ids4
        np.testing.assert_allclose([x[1] for x in lp1], [x[1] for x in lp4], atol=1e-4)
        assert [[t for t, _ in x[2]] for x in lp1] == [[t for t, _ in x[2]] for x in lp4]
