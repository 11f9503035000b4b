"""Tokenizers: HF `tokenizers` from tokenizer.json, or bytes for models without one.

The byte tokenizer (the tiny default model's) maps byte b to id b and keeps
ids 256.. for special tokens (bos = 256, eos = 257 in configs/tiny.json).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence


class ByteTokenizer:
    def __init__(self, bos_id: Optional[int] = 256, eos_ids: Sequence[int] = (257,)):
        self.bos_id, self.eos_ids = bos_id, tuple(eos_ids)
        self.chat_template = None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, model_dir: str, bos_id: Optional[int], eos_ids: Sequence[int]):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.bos_id, self.eos_ids = bos_id, tuple(eos_ids)
        self.chat_template = None
        tc = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.exists(tc):
            with open(tc) as f:
                self.chat_template = json.load(f).get("chat_template")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(model_path: str, bos_id, eos_ids):
    if os.path.isdir(model_path) and os.path.exists(os.path.join(model_path, "tokenizer.json")):
        return HFTokenizer(model_path, bos_id, eos_ids)
    return ByteTokenizer(bos_id, eos_ids)


class IncrementalDecoder:
    """Text deltas for a growing token list, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.emitted = tokenizer, [], ""

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta
