"""An HF model dir served the way transformers runs it: chat template, stop ids, context length, streamed text.

Two tiny Llamas saved by `transformers`, with tokenizers trained by `tokenizers`:
- "bpe": a byte-level BPE tokenizer with a Llama-3-style chat template (saved as chat_template.jinja),
  a generation_config.json listing two stop ids (<|end_of_text|>, <|eot_id|>; config.json has only the
  first), 512 positions. Its lm_head rows are arranged so that greedy decoding of PROMPT ends on <|eot_id|>.
- "sp": a SentencePiece-style tokenizer (Metaspace, byte fallback, a Strip decoder), no chat template;
  arranged so that greedy decoding of "Hello" starts with a `▁`-token (a leading space).
Each is served by a real uvicorn on loopback and driven by the official `openai` client; every
answer is compared with transformers (greedy tokens, where they stop, prompt tokens, text).
"""
from __future__ import annotations

import contextlib
import functools
import json
import random

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from server import create_app
from slora_jax import LLM, RequestTooLong, SamplingParams
from slora_jax.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDecoder
from tests.serving import on_loopback
from tests import hf_fixtures

CORPUS = ["Hello world, this is a tiny corpus for a tiny tokenizer.", "The quick brown fox jumps over the lazy dog.",
          "Ünïcödé text: café, naïve, 日本語 and an emoji 🙂.", "Once upon a time there was a model that talked."] * 20
BPE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
BOS, END, EOT = 0, 1, 2  # ids of the first three specials
TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
            "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MAX_POS = 512
PROMPT_TEXT = "Once upon a time"
N_GEN = 24
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, café?"}]
ENGINE = dict(kernels="xla", max_rank=8, page_rows=16, max_running=4, max_batch_tokens=64)


# -- model dirs ----------------------------------------------------------------------------------------
def byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=BPE_SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def sentencepiece_style() -> Tokenizer:
    """Llama-2's shape: Metaspace (prepend "▁" to the first word), BPE with <0xXX> byte fallback, and a decoder
    that replaces "▁" by spaces, decodes byte runs, and strips one leading space."""
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = meta
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                         show_progress=False))
    trained = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


def save_tokenizer(tok: Tokenizer, path, **special) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)
    if "chat_template" in special:
        hf.chat_template = special["chat_template"]
    hf.save_pretrained(str(path))


def hf_greedy(model_dir: str, ids: list, n: int, stop: bool) -> list:
    """transformers' greedy continuation; `stop`: with the model dir's generation config (its eos ids)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kw = {} if stop else dict(eos_token_id=None, min_new_tokens=n)
    inputs = torch.tensor([ids])
    with torch.no_grad():  # an explicit mask: the pad id must not mask a prompt token that shares it
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def swap_lm_head_rows(model_dir: str, a: int, b: int) -> None:
    """Greedy decoding then picks b wherever it picked a (and the reverse); nothing else changes."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        w = model.lm_head.weight
        w[[a, b]] = w[[b, a]].clone()
    model.save_pretrained(model_dir, safe_serialization=True)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    tok = byte_level_bpe()
    save_tokenizer(tok, path, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=TEMPLATE)
    assert (path / "chat_template.jinja").exists() and "chat_template" not in json.loads(
        (path / "tokenizer_config.json").read_text())
    hf_fixtures.save_tiny_llama(path, vocab_size=tok.get_vocab_size(), max_position_embeddings=MAX_POS,
                                bos_token_id=BOS, eos_token_id=END)
    ids = [BOS] + tok.encode(PROMPT_TEXT, add_special_tokens=False).ids
    free = hf_greedy(str(path), ids, N_GEN, stop=False)
    # the first new token at position >= 3, before any stop id: make greedy decoding say <|eot_id|> there
    k = next(k for k in range(3, N_GEN) if free[k] not in free[:k] and free[k] > EOT)
    assert not {END, EOT} & set(free[: k + 1])
    swap_lm_head_rows(str(path), free[k], EOT)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": [END, EOT]}))
    return str(path)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp")
    tok = sentencepiece_style()
    save_tokenizer(tok, path, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf_fixtures.save_tiny_llama(path, vocab_size=tok.get_vocab_size(), max_position_embeddings=MAX_POS,
                                bos_token_id=1, eos_token_id=2, seed=3)
    ids = [1] + tok.encode("Hello", add_special_tokens=False).ids
    first = hf_greedy(str(path), ids, 1, stop=False)[0]
    spaced = tok.token_to_id("▁wor") or next(i for t, i in sorted(tok.get_vocab().items()) if t.startswith("▁") and
                                             len(t) > 2)
    if first != spaced:
        swap_lm_head_rows(str(path), first, spaced)
    return str(path)


def hf_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def text_after(tok, prompt: list, out: list) -> str:
    """What a server should return: decode(prompt + output) minus decode(prompt), as transformers decodes."""
    full, head = tok.decode(prompt + out, skip_special_tokens=True), tok.decode(prompt, skip_special_tokens=True)
    assert full.startswith(head)
    return full[len(head):]


# -- servers -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def running(app):
    with on_loopback(app) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    llm = LLM(bpe_dir, **ENGINE)
    with running(create_app(llm, served_model_name=["bpe-chat", "alias"])) as client:
        yield llm, client


@pytest.fixture(scope="module")
def sp(sp_dir):
    llm = LLM(sp_dir, **ENGINE)
    with running(create_app(llm)) as client:
        yield llm, client


def stream_text(stream, chat: bool) -> tuple[str, list]:
    text, reasons = "", []
    for ch in stream:
        for c in ch.choices:
            text += (c.delta.content or "") if chat else c.text
            reasons += [c.finish_reason] if c.finish_reason else []
    return text, reasons


# -- the model dir's defaults ------------------------------------------------------------------------------
def test_defaults_come_from_the_model_dir(bpe):
    llm, client = bpe
    assert llm.max_model_len == MAX_POS  # max_position_embeddings
    assert llm.engine_cfg.dtype == "float32"  # on CPU
    assert set(llm.tokenizer.eos_ids) == {END, EOT}  # config.json + generation_config.json + the tokenizer's eos
    cards = client.models.list().data
    assert [c.id for c in cards] == ["bpe-chat"] and cards[0].model_dump()["max_model_len"] == MAX_POS
    assert not any("/" in json.dumps(c.model_dump()) for c in cards)  # no server paths


def test_greedy_tokens_and_where_they_stop_match_transformers(bpe, bpe_dir):
    llm, client = bpe
    tok = hf_tokenizer(bpe_dir)
    ids = [BOS] + tok.encode(PROMPT_TEXT, add_special_tokens=False)
    expected = hf_greedy(bpe_dir, ids, N_GEN, stop=True)
    assert expected[-1] == EOT and len(expected) < N_GEN  # transformers stops at generation_config's second eos

    out = llm.generate([ids], sampling=SamplingParams(max_tokens=N_GEN))[0]
    assert out.token_ids == expected and out.finish_reason == "stop"
    text = text_after(tok, ids, expected)
    assert out.text == text and "".join(llm.stream(ids, sampling=SamplingParams(max_tokens=N_GEN))) == text

    for model in ("bpe-chat", "alias", "base"):
        r = client.completions.create(model=model, prompt=ids, max_tokens=N_GEN, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "stop")
        assert r.usage.completion_tokens == len(expected) and r.model == model
    streamed, reasons = stream_text(client.completions.create(model="bpe-chat", prompt=ids, max_tokens=N_GEN,
                                                              temperature=0, stream=True), chat=False)
    assert streamed == text and reasons == ["stop"]


def test_chat_renders_the_template_like_apply_chat_template(bpe, bpe_dir):
    llm, client = bpe
    tok = hf_tokenizer(bpe_dir)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert llm.apply_chat_template(MESSAGES) == ids
    expected = hf_greedy(bpe_dir, ids, 12, stop=True)
    text = text_after(tok, ids, expected)

    r = client.chat.completions.create(model="bpe-chat", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("stop" if expected[-1] in (END, EOT) else "length")
    streamed, _ = stream_text(client.chat.completions.create(model="bpe-chat", messages=MESSAGES, max_tokens=12,
                                                             temperature=0, stream=True), chat=True)
    assert streamed == text
    tokenized = httpx.post(str(client.base_url).removesuffix("/v1/") + "/tokenize", json={"messages": MESSAGES}).json()
    assert tokenized["tokens"] == ids and tokenized["count"] == len(ids) and tokenized["max_model_len"] == MAX_POS


def test_overlong_requests_are_refused_not_clamped(bpe):
    llm, client = bpe
    long_prompt = [BOS] + [40] * 499
    with pytest.raises(openai.BadRequestError) as e:  # 500 + 20 > 512
        client.completions.create(model="bpe-chat", prompt=long_prompt, max_tokens=20)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert "maximum context length is 512 tokens" in e.value.message and "520" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="bpe-chat", prompt=[BOS] + [40] * 511, max_tokens=1, stream=True)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="bpe-chat", messages=[{"role": "user", "content": "go " * 300}],
                                       max_tokens=400)
    assert e.value.code == "context_length_exceeded"
    r = client.completions.create(model="bpe-chat", prompt=long_prompt, max_tokens=12, temperature=0)  # 512: fits
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= MAX_POS

    with pytest.raises(RequestTooLong, match="maximum context length is 512"):
        llm.submit(long_prompt, sampling=SamplingParams(max_tokens=20))
    assert llm.generate([long_prompt], sampling=SamplingParams(max_tokens=20))[0].finish_reason == "error"


# -- SentencePiece-style -------------------------------------------------------------------------------
def test_sentencepiece_text_keeps_the_leading_space(sp, sp_dir):
    llm, client = sp
    tok = hf_tokenizer(sp_dir)
    ids = [1] + tok.encode("Hello", add_special_tokens=False)
    expected = hf_greedy(sp_dir, ids, 10, stop=True)
    text = text_after(tok, ids, expected)
    assert text.startswith(" ")  # "Hello" + "▁wor..." = "Hello wor..."

    out = llm.generate([ids], sampling=SamplingParams(max_tokens=10))[0]
    assert out.token_ids == expected and out.text == text
    r = client.completions.create(model="base", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == text
    streamed, _ = stream_text(client.completions.create(model="base", prompt=ids, max_tokens=10, temperature=0,
                                                        stream=True), chat=False)
    assert streamed == text
    assert client.completions.create(model="base", prompt="Hello", max_tokens=10, temperature=0).choices[0].text == text


def test_chat_without_a_template_is_a_clear_400(sp):
    _, client = sp
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=4)
    assert "no chat template" in e.value.message and "--chat-template" in e.value.message
    assert e.value.param == "messages"


@pytest.mark.parametrize("which", ["bytes", "bpe", "sp"])
def test_special_tokens_keep_the_decoding_window_short(which, tmp_path):
    """Long runs of special tokens (ids decode() skips: most of a random-weight model's ids under the byte
    tokenizer) between text tokens: the deltas stay exact, and the window a push decodes stays a few
    tokens long instead of growing with every special token."""
    if which == "bytes":
        ours = ByteTokenizer()
        whole = ours.decode
        specials, texts = list(range(256, 32000)), list(range(32, 127))
    else:
        tok = byte_level_bpe() if which == "bpe" else sentencepiece_style()
        save_tokenizer(tok, tmp_path, bos_token="<s>", eos_token="</s>")
        ours, theirs = HFTokenizer(str(tmp_path), 1, (2,)), hf_tokenizer(str(tmp_path))
        whole = functools.partial(theirs.decode, skip_special_tokens=True)
        specials = sorted(ours.special_ids)
        texts = [i for i in range(tok.get_vocab_size()) if i not in ours.special_ids and i not in ours.byte_fallback_ids]
    rng = random.Random(1)
    prompt = [rng.choice(texts) for _ in range(4)]
    out = [rng.choice(specials) if rng.random() < 0.9 else rng.choice(texts) for _ in range(600)]
    dec = IncrementalDecoder(ours, prompt)
    widest = 0
    deltas = []
    for t in out:
        deltas.append(dec.push([t]))
        widest = max(widest, len(dec.ids) - dec.prefix_offset)
    head = whole(prompt)
    assert "".join(deltas) + dec.flush() == whole(prompt + out)[len(head):]
    assert widest <= 8, widest


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_incremental_decoding_equals_decoding_the_whole(which, tmp_path):
    """Random token sequences (byte tokens and specials included), pushed one by one after a prompt: the
    deltas concatenate to transformers' decode(prompt + output) minus decode(prompt)."""
    tok = byte_level_bpe() if which == "bpe" else sentencepiece_style()
    special = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>") if which == "bpe" else \
        dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    save_tokenizer(tok, tmp_path, **special)
    ours, theirs = HFTokenizer(str(tmp_path), 1, (2,)), hf_tokenizer(str(tmp_path))
    byte_ids = sorted(ours.byte_fallback_ids) or list(range(5, 260))
    assert bool(ours.byte_fallback_ids) == (which == "sp")
    rng, vocab, checked = random.Random(0), tok.get_vocab_size(), 0
    for trial in range(3000):
        ids = [rng.choice(byte_ids) if trial % 2 and rng.random() < 0.5 else rng.randrange(vocab)
               for _ in range(rng.randrange(2, 30))]
        k = rng.randrange(1, len(ids))
        prompt, out = ids[:k], ids[k:]
        if prompt[-1] in ours.byte_fallback_ids:  # output bytes may join the prompt's byte run: no "minus"
            continue
        full = theirs.decode(ids, skip_special_tokens=True)
        head = theirs.decode(prompt, skip_special_tokens=True)
        if not full.startswith(head):
            continue
        dec = IncrementalDecoder(ours, prompt)
        assert "".join(dec.push([t]) for t in out) + dec.flush() == full[len(head):], (prompt, out)
        checked += 1
    assert checked > 900
