"""GLM-5.1 output parsing (daemon/glm_chat.py) on recorded GLM-format outputs, well-formed and broken.

Oracle for the well-formed ones: a regex reading of the format written here from vLLM's documented behaviour
for its GLM-4.5/4.7 parsers (reasoning up to </think>; `<tool_call>NAME ... </tool_call>` regions;
`<arg_key>K</arg_key> <arg_value>V</arg_value>` pairs; values verbatim when the schema says string, else
JSON, else a Python literal, else the text), independent of the streaming state machine under test.
Streaming is checked by cutting every output at random places (and at every character): the deltas must
add up to the whole parse.
"""

from __future__ import annotations

import ast
import json
import random
import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moed.client import protocol as cp
from moed.daemon.glm_chat import ChatOutputParser, merge_tool_calls, parse_output, prompt_opens_reasoning

TOOLS = msgspec.convert(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "write_file",
                "parameters": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                },
            },
        },
        {"type": "function", "function": {"name": "search"}},
    ],
    list[cp.Tool],
)

# Recorded GLM-format outputs: (text after the generation prompt, prompt opened <think>).
WELL_FORMED = {
    "glm5_tool_call": (
        "The user asks for the weather in Beijing. I should call get_weather.</think>I'll check the weather."
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value><arg_key>days</arg_key>"
        "<arg_value>3</arg_value></tool_call>",
        True,
    ),
    "glm45_newlines_and_own_think": (
        "<think>Need the weather.</think>\nLet me look that up.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Beijing</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
        False,
    ),
    "two_calls": (
        "Two cities.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>上海 🙂</arg_value></tool_call>",
        True,
    ),
    "code_in_a_string_argument": (
        "Writing the file.</think><tool_call>write_file<arg_key>path</arg_key><arg_value>/tmp/a.py</arg_value>"
        "<arg_key>content</arg_key><arg_value>def f(x):\n    return \"q\\\\n\" + 'x' + '</arg' # < >\n"
        "</arg_value></tool_call>",
        True,
    ),
    "values_read_as_json_or_python": (
        "</think><tool_call>search<arg_key>q</arg_key><arg_value>moed</arg_value><arg_key>n</arg_key>"
        "<arg_value> 5 </arg_value><arg_key>exact</arg_key><arg_value>True</arg_value><arg_key>filters</arg_key>"
        '<arg_value>{"lang": ["en", "de"], "x": null}</arg_value><arg_key>quoted</arg_key>'
        "<arg_value>'single'</arg_value><arg_key>num_text</arg_key><arg_value>007</arg_value></tool_call>",
        False,
    ),
    "stray_spaces_like_llama_cpp_issue": (
        "Let me search for configuration files: <tool_call>ls <arg_key>dirPath</arg_key> "
        "<arg_value>backend</arg_value> </tool_call>",
        False,
    ),
    "no_arguments": ("Checking.</think>Sure.<tool_call>search</tool_call>", True),
    "thinking_off_plain_answer": ("Paris is the capital of France.", False),
    "reasoning_only_cut_by_max_tokens": ("Let me think about this carefully, step by step", True),
    "answer_mentions_tags_in_prose": ("ok</think>Use <tools> and <think> tags; a < b and <tool_ are fine.", True),
}


def oracle(text: str, thinking: bool, tools: list[cp.Tool] | None) -> tuple[str, str, list[tuple[str, dict]]]:
    """(reasoning, content before the first call, [(name, arguments)]) of a well-formed output."""
    reasoning, content = "", text
    if thinking or text.lstrip().startswith("<think>"):
        body = text.lstrip().removeprefix("<think>") if text.lstrip().startswith("<think>") else text
        reasoning, _, content = body.partition("</think>")
    strings = {
        t.function.name: {
            k for k, v in ((t.function.parameters or {}).get("properties") or {}).items() if v.get("type") == "string"
        }
        for t in tools or ()
    }
    calls = []
    for region in re.findall(r"<tool_call>(.*?)</tool_call>", content, re.S):
        name = re.split(r"\n|<arg_key>", region, maxsplit=1)[0].strip()
        args = {}
        for key, value in re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", region, re.S):
            key = key.strip()
            if key in strings.get(name, ()):
                args[key] = value
                continue
            for parse in (json.loads, ast.literal_eval):
                try:
                    args[key] = parse(value.strip())
                    break
                except (ValueError, SyntaxError):
                    continue
            else:
                args[key] = value
        calls.append((name, args))
    head = content.split("<tool_call>")[0] if calls else content
    return reasoning, head, calls


def stream(text: str, thinking: bool, tools, cuts: list[int]):
    """Feed the text in pieces cut at `cuts`; returns (reasoning, content, merged calls, deltas)."""
    parser = ChatOutputParser(thinking, tools)
    deltas = []
    last = 0
    for cut in [*cuts, len(text)]:
        deltas.append(parser.feed(text[last:cut]))
        last = cut
    rest, _ = parser.finish(whole=False)
    deltas.append(rest)
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    return reasoning, content, merge_tool_calls([c for d in deltas for c in d.tool_calls]), deltas


@pytest.mark.parametrize("name", WELL_FORMED)
def test_recorded_outputs_parse_as_vllms_glm_parsers_read_them(name):
    text, thinking = WELL_FORMED[name]
    want_reasoning, want_head, want_calls = oracle(text, thinking, TOOLS)
    got = parse_output(text, thinking, TOOLS)
    assert got.reasoning == want_reasoning
    assert got.content.startswith(want_head) and got.content[len(want_head) :].strip() == ""
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == want_calls
    assert all(c.id.startswith("call_") and c.index == i for i, c in enumerate(got.tool_calls))
    # the arguments text is json.dumps of the object, so clients that compare strings agree with vLLM's output
    assert [c.arguments for c in got.tool_calls] == [json.dumps(a, ensure_ascii=False) for _, a in want_calls]


def test_string_schema_keeps_values_verbatim_and_others_are_read():
    got = parse_output(WELL_FORMED["values_read_as_json_or_python"][0], False, TOOLS)
    args = json.loads(got.tool_calls[0].arguments)
    assert args == {
        "q": "moed",
        "n": 5,
        "exact": True,
        "filters": {"lang": ["en", "de"], "x": None},
        "quoted": "single",
        "num_text": "007",
    }  # "007" is neither JSON nor a literal: kept as text
    code = json.loads(parse_output(WELL_FORMED["code_in_a_string_argument"][0], True, TOOLS).tool_calls[0].arguments)
    assert code["content"] == "def f(x):\n    return \"q\\\\n\" + 'x' + '</arg' # < >\n"
    # without tools' schemas every value is read; "Beijing" is no JSON, so it stays text, "3" becomes 3
    plain = parse_output(WELL_FORMED["glm5_tool_call"][0], True, [])
    assert json.loads(plain.tool_calls[0].arguments) == {"city": "Beijing", "days": 3}


@pytest.mark.parametrize("name", WELL_FORMED)
def test_streamed_deltas_add_up_to_the_whole_parse(name):
    text, thinking = WELL_FORMED[name]
    whole = parse_output(text, thinking, TOOLS)
    rng = random.Random(name)
    cut_sets = [list(range(1, len(text)))] + [
        sorted(rng.sample(range(1, len(text)), min(len(text) - 1, k))) for k in (1, 3, 17) for _ in range(20)
    ]
    for cuts in cut_sets:
        reasoning, content, calls, deltas = stream(text, thinking, TOOLS, cuts)
        assert (reasoning, content) == (whole.reasoning, whole.content)
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.tool_calls]
        firsts = [c for d in deltas for c in d.tool_calls if c.name is not None]
        assert [c.index for c in firsts] == list(range(len(whole.tool_calls)))  # id and name once per call
        assert all(c.id for c in firsts)


def test_string_arguments_stream_before_the_value_closes():
    text = "</think><tool_call>write_file<arg_key>content</arg_key><arg_value>line one\nline two"
    parser = ChatOutputParser(True, TOOLS)
    out = parser.feed(text)
    args = "".join(c.arguments for c in out.tool_calls)
    assert out.tool_calls[0].name == "write_file" and args == '{"content": "line one\\nline two'
    more = parser.feed(" and more</arg_value></tool_call>")
    assert args + "".join(c.arguments for c in more.tool_calls) == '{"content": "line one\\nline two and more"}'


def test_reasoning_splits_where_the_prompt_leaves_it():
    assert prompt_opens_reasoning("[gMASK]<sop><|user|>hi<|assistant|><think>")
    assert not prompt_opens_reasoning("[gMASK]<sop><|user|>hi<|assistant|></think>")
    assert not prompt_opens_reasoning("[gMASK]<sop><|user|>hi<|assistant|>")
    assert not prompt_opens_reasoning("<|assistant|><think>done</think>")
    off = parse_output("Just the answer. </think> stays text", False)
    assert (off.reasoning, off.content) == ("", "Just the answer. </think> stays text")
    on = parse_output("<think>repeated tag</think>answer", True)
    assert (on.reasoning, on.content) == ("repeated tag", "answer")
    assert parse_output("  \n<think>r</think>a", False).reasoning == "r"


BROKEN = {
    # (text, thinking) -> what the whole parse gives: content, names of the calls
    "unterminated_call_cut_by_max_tokens": (
        "Let me check.</think>Sure.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Bei",
        True,
        "Sure.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Bei",
        [],
    ),
    "no_name": (
        "</think>x<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>y",
        True,
        "x<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>y",
        [],
    ),
    "name_with_spaces": (
        "</think><tool_call>get the weather\n</tool_call>",
        True,
        "<tool_call>get the weather\n</tool_call>",
        [],
    ),
    "name_never_ends": ("</think><tool_call>" + "a" * 400, True, "<tool_call>" + "a" * 400, []),
    "stray_close": ("</think>done</tool_call> really</arg_value>", True, "done</tool_call> really</arg_value>", []),
    "broken_then_good": (
        "</think><tool_call>bad name</tool_call><tool_call>search<arg_key>q</arg_key><arg_value>x</arg_value>"
        "</tool_call>",
        True,
        "<tool_call>bad name</tool_call>",
        ["search"],
    ),
    "key_without_value": ("</think><tool_call>search<arg_key>q</arg_key></tool_call>", True, "", ["search"]),
    "value_without_close": (
        "</think><tool_call>search<arg_key>q</arg_key><arg_value>x</tool_call>",
        True,
        "",
        ["search"],
    ),
    "junk_between_pairs": (
        "</think><tool_call>search junk? no: name ends at newline\n</tool_call>",
        True,
        "<tool_call>search junk? no: name ends at newline\n</tool_call>",
        [],
    ),
    "nested_open": (
        "</think><tool_call>search<arg_key>q</arg_key><arg_value><tool_call>x</arg_value></tool_call>",
        True,
        "",
        ["search"],
    ),
    "unclosed_think": ("all reasoning <tool_call>search</tool_call>", True, "", []),
    "huge_literal": (
        "</think><tool_call>search<arg_key>n</arg_key><arg_value>" + "[" * 5000 + "</arg_value>"
        "<arg_key>m</arg_key><arg_value>" + "9" * 5000 + "</arg_value><arg_key>s</arg_key>"
        "<arg_value>{1, 2}</arg_value></tool_call>",
        True,
        "",
        ["search"],
    ),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_tool_calls_become_plain_content_never_a_crash(name):
    text, thinking, want_content, want_names = BROKEN[name]
    got = parse_output(text, thinking, TOOLS)
    assert got.content == want_content
    assert [c.name for c in got.tool_calls] == want_names
    for call in got.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    for cuts in ([], list(range(1, len(text), 7))):  # streamed too: no exception, valid JSON for closed calls
        _, _, calls, _ = stream(text, thinking, TOOLS, cuts)
        assert [c.name for c in calls][: len(want_names)] == want_names


def test_huge_and_odd_values_are_kept_as_text():
    args = json.loads(parse_output(BROKEN["huge_literal"][0], True, TOOLS).tool_calls[0].arguments)
    assert args["n"] == "[" * 5000 and args["m"] == "9" * 5000 and args["s"] == "{1, 2}"


def test_streamed_unterminated_call_stays_open_as_openai_leaves_cut_arguments():
    text = BROKEN["unterminated_call_cut_by_max_tokens"][0]
    _, content, calls, _ = stream(text, True, TOOLS, list(range(1, len(text))))
    assert content == "Sure." and [c.name for c in calls] == ["get_weather"]
    assert calls[0].arguments == '{"city": "Bei'  # a string argument streams; the cut leaves it unterminated


PIECES = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool",
    "</arg",
    "<",
    ">",
    "\n",
    " ",
    "get_weather",
    "city",
    "Beijing",
    "3",
    '{"a": 1}',
    "x y",
    '"',
    "\\",
    "é",
    "🙂",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES), max_size=40),
    st.booleans(),
    st.lists(st.integers(1, 200), max_size=8),
    st.booleans(),
)
def test_any_output_parses_without_error_and_closed_calls_are_json(pieces, thinking, cuts, with_tools):
    text = "".join(pieces)
    tools = TOOLS if with_tools else []
    whole = parse_output(text, thinking, tools)
    for call in whole.tool_calls:
        assert isinstance(json.loads(call.arguments), dict) and call.name
    _, _, calls, _ = stream(text, thinking, tools, sorted({c for c in cuts if c < len(text)}))
    assert [c.name for c in calls][: len(whole.tool_calls)] == [c.name for c in whole.tool_calls]
    closed = [c for c in calls if c.index < len(whole.tool_calls)]
    assert [c.arguments for c in closed] == [c.arguments for c in whole.tool_calls]
