"""Daemon text handling: chat templates, incremental detokenisation, stop strings (no engine)."""

from __future__ import annotations

import os
import random

import pytest

from moed.client import protocol as cp
from moed.daemon.detokenizer import IncrementalDetokenizer, StopStrings
from moed.daemon.request import GenerateRequest
from moed.daemon.tokenizer import TemplateError, TextTokenizer
from moed.engine import protocol as ep


@pytest.fixture(scope="module")
def tok(tiny_checkpoint) -> TextTokenizer:
    return TextTokenizer(tiny_checkpoint)


def _byte_ids(tok: TextTokenizer, text: str) -> list[int]:
    """Ids of single-byte tokens spelling `text` byte by byte (every multi-byte character split)."""
    from tokenizers import pre_tokenizers

    vocab = tok.tokenizer.get_vocab()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # GPT-2 byte-to-unicode table: printable bytes map to themselves, the rest to 256+n.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    assert set(table.values()) == set(alphabet)
    return [vocab[table[b]] for b in text.encode()]


def test_chat_template_matches_transformers(tok, tiny_checkpoint):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Grüße, 你好 🙂"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and now?"},
    ]
    for gen in (True, False):
        want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert tok.encode_chat(messages, gen) == list(want)
    # GLM-5.1's chat features: tools, tool calls and results, chat_template_kwargs (enable_thinking)
    params = {"type": "object", "properties": {"q": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "lookup", "description": "<x> & 'y'", "parameters": params}}]
    messages = [
        {"role": "user", "content": "find it"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "use the tool",
            "tool_calls": [{"id": "c", "function": {"name": "lookup", "arguments": {"q": "x"}}}],
        },
        {"role": "tool", "content": "found"},
    ]
    for kwargs in ({}, {"enable_thinking": False}):
        want = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
        assert tok.render_chat(messages, True, tools, kwargs) == want


def test_template_errors_are_reported(tmp_path, tiny_checkpoint):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, d, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}x"
    )
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = TextTokenizer(d)
    assert t.render_chat([{"role": "user", "content": "a"}]) == "x"
    with pytest.raises(TemplateError, match="first must be user"):
        t.render_chat([{"role": "system", "content": "a"}])
    cfg["chat_template"] = "{{ ''.__class__.__mro__ }}"  # the sandbox refuses attribute tricks
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TemplateError):
        TextTokenizer(d).render_chat([{"role": "user", "content": "a"}])
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TemplateError, match="no chat template"):
        TextTokenizer(d).render_chat([{"role": "user", "content": "a"}])


def test_multibyte_characters_split_across_tokens(tok):
    text = "a你好🙂é—z"
    ids = _byte_ids(tok, text)
    assert len(ids) == len(text.encode())
    detok = IncrementalDetokenizer(tok, tok.encode("prompt: ", add_special_tokens=False))
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert not any("\ufffd" in d for d in deltas)  # never half a character
    assert [d for d in deltas if d] == list(text)  # each character exactly when its last byte arrives


def test_detokenizer_matches_full_decode_on_random_ids(tok):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    n_special = 12
    for trial in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        skip = rng.random() < 0.5
        if not skip:
            ids = [i for i in ids if i >= n_special]  # special tokens print as text only when kept
        prompt = tok.encode("The prompt ends here.", add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        out, i = [], 0
        while i < len(ids):
            k = rng.randrange(1, 4)
            out.append(detok.add(ids[i : i + k]))
            i += k
        out.append(detok.flush())
        assert "".join(out) == tok.decode(ids, skip_special_tokens=skip), f"seed {seed} trial {trial} ids {ids}"


def test_stop_strings_find_and_holdback():
    s = StopStrings(["</end>", "STOP"])
    assert s.find("abc</end>x STOP") == (3, "</end>")
    assert s.find("abc", 0) is None
    assert s.holdback("text </en") == 4  # could still become </end>
    assert s.holdback("text ST") == 2
    assert s.holdback("text") == 0
    assert s.holdback("</end") == 5
    assert not StopStrings([])


def _request(tok, prompt: str, stream: bool, stop: list[str], max_tokens: int = 100) -> GenerateRequest:
    msg = cp.Generate(
        id="r", prompt=prompt, stream=stream, sampling=cp.SamplingParams(stop=stop, max_tokens=max_tokens)
    )
    ids = tok.encode(prompt)
    return GenerateRequest(b"c", msg, "e1", ids, IncrementalDetokenizer(tok, ids), 0.0, None, 1)


@pytest.mark.parametrize("stream", [True, False])
def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tok, stream):
    text = "The quick brown fox jumps over the lazy dog."
    ids = _byte_ids(tok, text)  # one byte per token: "lazy" spans four tokens
    req = _request(tok, "x", stream, stop=["lazy", "zebra"])
    replies, abort = [], False
    for n, t in enumerate(ids):
        upd = req.on_output(ep.RequestOutput(request_id="e1", new_token_ids=[t]), float(n + 1))
        replies += upd.replies
        if upd.done:
            abort = upd.abort_engine
            break
    final = replies[-1]
    assert isinstance(final, cp.Final) and final.finish_reason == "stop" and final.stop == "lazy"
    assert abort  # the engine must be told to drop the request
    streamed = "".join(r.text for r in replies[:-1])
    assert streamed + final.text == "The quick brown fox jumps over the "
    if stream:
        assert len(replies) > 10 and not any("l" in r.text for r in replies[-5:-1])
    else:
        assert len(replies) == 1
    assert final.completion_tokens == len("The quick brown fox jumps over the lazy")


def test_engine_finish_flushes_held_text(tok):
    req = _request(tok, "x", True, stop=["lazy"])
    ids = _byte_ids(tok, "so la")
    out = []
    for t in ids[:-1]:
        out += req.on_output(ep.RequestOutput(request_id="e1", new_token_ids=[t]), 1.0).replies
    upd = req.on_output(ep.RequestOutput(request_id="e1", new_token_ids=[ids[-1]], finish_reason="length"), 2.0)
    assert upd.done and not upd.abort_engine and upd.finish_reason == "length"
    assert "".join(r.text for r in out) + upd.replies[-1].text == "so la"  # "la" was held back, then released
