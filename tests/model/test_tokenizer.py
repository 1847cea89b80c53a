"""The generated tokenizer: GLM special and text tokens, the GLM-5.1-structured chat template, and streaming across
multi-byte characters."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from moed.model.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, TEXT_TOKENS, render_chat


def test_special_tokens_and_eos_ids(tiny_checkpoint):
    tok = Tokenizer.from_file(str(Path(tiny_checkpoint) / "tokenizer.json"))
    cfg = json.loads((Path(tiny_checkpoint) / "config.json").read_text())
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS + TEXT_TOKENS] == list(range(len(SPECIAL_TOKENS + TEXT_TOKENS)))
    assert [tok.id_to_token(i) for i in cfg["eos_token_id"]] == ["<|endoftext|>", "<|user|>", "<|observation|>"]
    assert tok.get_vocab_size() <= cfg["vocab_size"]


def test_chat_template_renders_glm_turns(tiny_checkpoint):
    tcfg = json.loads((Path(tiny_checkpoint) / "tokenizer_config.json").read_text())
    text = render_chat(
        tcfg["chat_template"], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == "[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|><think>"
    tok = Tokenizer.from_file(str(Path(tiny_checkpoint) / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]
    assert ids[-2:] == [tok.token_to_id("<|assistant|>"), tok.token_to_id("<think>")]


def test_chat_template_has_glm51_structure_for_tools_and_thinking():
    """What GLM-4.7 / GLM-5's published template renders for the same conversation (checked against it by hand):
    tools block, earlier reasoning dropped, the current turn's kept, XML tool calls, tool results after one
    <|observation|>, and a generation prompt that opens reasoning or closes it when thinking is off."""
    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather <now> & 你好", "parameters": params},
        }
    ]
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "<think>\nold\n</think>\nfirst"},
        {"role": "user", "content": [{"type": "text", "text": "in "}, {"type": "text", "text": "Paris"}]},
        {
            "role": "assistant",
            "content": " ok ",
            "reasoning_content": " need a tool ",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}},
                }
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "warm"},
    ]
    head = (
        "[gMASK]<sop><|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & 你好", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n</tools>\n\n'
        "For each function call, output the function name and arguments within the following XML format:\n"
        "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
        "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
    )
    turns = (
        "<|user|>weather?<|assistant|></think>first<|user|>in Paris<|assistant|><think>need a tool</think>ok"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key>"
        "<arg_value>[1, 2]</arg_value></tool_call><|observation|><tool_response>sunny</tool_response>"
        "<tool_response>warm</tool_response>"
    )
    assert render_chat(CHAT_TEMPLATE, messages, tools=tools) == head + turns + "<|assistant|><think>"
    off = render_chat(CHAT_TEMPLATE, messages, tools=tools, enable_thinking=False)
    assert off == head + turns + "<|assistant|></think>"
    assert render_chat(CHAT_TEMPLATE, messages, add_generation_prompt=False) == "[gMASK]<sop>" + turns
    kept = render_chat(CHAT_TEMPLATE, messages, clear_thinking=False)
    assert "<|assistant|><think>old</think>first" in kept


def test_think_and_tool_tokens_survive_skipping_special_tokens(tiny_checkpoint):
    tok = Tokenizer.from_file(str(Path(tiny_checkpoint) / "tokenizer.json"))
    text = "<think>r</think><tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>"
    ids = tok.encode(text + "<|observation|>", add_special_tokens=False).ids
    assert all(tok.token_to_id(t) in ids for t in TEXT_TOKENS[:8])
    assert tok.decode(ids, skip_special_tokens=True) == text
