"""The generated tokenizer: GLM special tokens, chat template, and streaming across multi-byte characters."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from moed.engine.generate import stream_text
from moed.model.tokenizer import SPECIAL_TOKENS, render_chat


def test_special_tokens_and_eos_ids(tiny_checkpoint):
    tok = Tokenizer.from_file(str(Path(tiny_checkpoint) / "tokenizer.json"))
    cfg = json.loads((Path(tiny_checkpoint) / "config.json").read_text())
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert [tok.id_to_token(i) for i in cfg["eos_token_id"]] == ["<|endoftext|>", "<|user|>", "<|observation|>"]
    assert tok.get_vocab_size() <= cfg["vocab_size"]


def test_chat_template_renders_glm_turns(tiny_checkpoint):
    tcfg = json.loads((Path(tiny_checkpoint) / "tokenizer_config.json").read_text())
    text = render_chat(tcfg["chat_template"], [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}])
    assert text == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n"
    tok = Tokenizer.from_file(str(Path(tiny_checkpoint) / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]


def test_streamed_text_is_exact_across_multibyte_characters(tiny_checkpoint):
    tok = Tokenizer.from_file(str(Path(tiny_checkpoint) / "tokenizer.json"))
    text = "Grüße 你好 🚀 done"
    ids = tok.encode(text, add_special_tokens=False).ids
    # byte-level BPE splits some characters across tokens; no delta may contain a broken character
    deltas = list(stream_text(lambda x: tok.decode(x), iter(ids)))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
