"""GLM-5.1's chat semantics: messages into the chat template, and model output into reasoning, content and
OpenAI tool calls, streamed or whole.

Prompt side: OpenAI-shaped messages (content as a string or a list of text parts; assistant `tool_calls`
whose `arguments` are a JSON string; tool results) become the dicts GLM's template reads: text parts
joined, arguments parsed into a mapping (the template writes each argument as `<arg_key>`/`<arg_value>`).

Output side, after GLM-4.7 / GLM-5's generation prompt `<|assistant|><think>` (`</think>` with thinking
off): the model writes its reasoning, `</think>`, then the answer; GLM-4.5-style turns may open with
`<think>` themselves. The answer may hold tool calls, in GLM-4.7/5's form or GLM-4.5/4.6's (newlines
between the parts):

    <tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...</tool_call>

A value is taken verbatim when the request's tool schema types that argument "string"; otherwise it is
read as JSON, then as a Python literal, else kept as a string (what vLLM's GLM-4.5/4.7 parsers do). The
arguments become one JSON object text, `{"KEY": VALUE, ...}` with json.dumps' separators, streamed as it
arrives: a call's id and name once the name is complete, string values character by character, other
values when closed, the final `}` with `</tool_call>`; the deltas of a call always add up to the
complete arguments text. Text outside tool calls is content (held back only while it could be the start of
`<tool_call>`). A tool call that cannot be read becomes plain content: a name that is empty, too long or not
a name, and, when the output is returned whole, a call the output never closes (streamed, such a call
was already sent: its arguments stay unterminated, as OpenAI's do when max_tokens cuts them).
Nothing here raises on model output.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"
ASSISTANT = "<|assistant|>"
MAX_NAME_CHARS = 256
_NAME = re.compile(r"[^\s<>\"'`{}()\[\],;]+")  # a function name: no whitespace, markup or punctuation of code


class ChatInputError(ValueError):
    """A message the template cannot be given; `field` is its dotted path, e.g. messages[2].tool_calls[0]."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def template_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """The chat template's view of protocol messages (client.protocol.ChatMessage): text parts joined, tool-call
    arguments parsed from their JSON text, absent content as ''. Raises ChatInputError naming the message."""
    out = []
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": m.role, "content": text_content(m.content)}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            d["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            calls = []
            for j, tc in enumerate(m.tool_calls):
                try:
                    args = json.loads(tc.function.arguments) if tc.function.arguments.strip() else {}
                except (ValueError, RecursionError) as e:
                    raise ChatInputError(
                        f"tool call arguments must be a JSON object: {e}",
                        f"messages[{i}].tool_calls[{j}].function.arguments",
                    ) from None
                if not isinstance(args, dict):
                    raise ChatInputError(
                        f"tool call arguments must be a JSON object, got {type(args).__name__}",
                        f"messages[{i}].tool_calls[{j}].function.arguments",
                    )
                calls.append(
                    {"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": args}}
                )
            d["tool_calls"] = calls
        out.append(d)
    return out


def text_content(content: str | Sequence[Any] | None) -> str:
    """A message's text: the string, or its text parts joined ('' when absent)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether the rendered prompt leaves the model inside `<think>` (GLM-4.7/5 with thinking on)."""
    tail = prompt[prompt.rfind(ASSISTANT) + 1 :] if ASSISTANT in prompt else prompt
    tail = tail.rstrip()
    return tail.endswith(THINK_OPEN) and THINK_CLOSE not in tail[tail.rfind(THINK_OPEN) :]


def string_arguments(tools: Sequence[Any] | None) -> dict[str, set[str]]:
    """Per function name, the arguments its JSON schema types "string" (their values are taken verbatim)."""
    out: dict[str, set[str]] = {}
    for tool in tools or ():
        props = (tool.function.parameters or {}).get("properties") if tool.function.parameters else None
        names = set()
        if isinstance(props, dict):
            names = {k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"}
        out[tool.function.name] = names
    return out


def _partial_tag(text: str, tags: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `tags` (text to hold back)."""
    best = 0
    for tag in tags:
        for k in range(min(len(text), len(tag) - 1), best, -1):
            if tag.startswith(text[-k:]):
                best = k
                break
    return best


def _value(raw: str) -> Any:
    """A non-string argument's value: JSON, else a Python literal, else the text (never raises)."""
    text = raw.strip()
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
            json.dumps(value)  # a set or bytes from literal_eval is no JSON value: keep the text
            return value
        except Exception:  # model output: any failure means "not this form"
            continue
    return raw


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: ChatDelta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


class ReasoningSplitter:
    """Text in, (reasoning, content) out. `in_reasoning`: the prompt opened `<think>` (thinking on); else
    reasoning starts only if the output itself opens with `<think>`."""

    def __init__(self, in_reasoning: bool):
        self.state = "reasoning" if in_reasoning else "start"
        self._buf = ""
        self._fresh = True  # no reasoning text yet: a repeated leading <think> is dropped

    def feed(self, text: str) -> tuple[str, str]:
        if self.state == "content":
            return "", text
        self._buf += text
        reasoning = content = ""
        if self.state == "start":
            head = self._buf.lstrip()
            if head.startswith(THINK_OPEN):
                self._buf, self.state = head[len(THINK_OPEN) :], "reasoning"
            elif THINK_OPEN.startswith(head):
                return "", ""  # could still become <think>
            else:
                self.state = "content"
                content, self._buf = self._buf, ""
                return "", content
        if self._fresh:
            head = self._buf.lstrip()
            if head.startswith(THINK_OPEN):
                self._buf = head[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(head) and head:
                return "", ""
        end = self._buf.find(THINK_CLOSE)
        if end >= 0:
            reasoning, content = self._buf[:end], self._buf[end + len(THINK_CLOSE) :]
            self._buf, self.state = "", "content"
        else:
            keep = _partial_tag(self._buf, (THINK_CLOSE,))
            reasoning, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        if reasoning.strip():
            self._fresh = False
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What is held back, at the end of the output."""
        buf, self._buf = self._buf, ""
        return (buf, "") if self.state == "reasoning" else ("", buf)


class ToolCallParser:
    """Content text in, content and tool-call deltas out (see the module docstring for the format)."""

    def __init__(self, string_args: dict[str, set[str]] | None = None):
        self.string_args = string_args or {}
        self.calls: list[str] = []  # each call's arguments text as sent so far
        self._buf = ""
        self._state = "text"  # text, name, between, key, after_key, value
        self._raw = ""  # the current call's text since <tool_call> (it becomes content if the call is unreadable)
        self._name = ""
        self._key = ""
        self._value = ""
        self._pairs = 0
        self._string_value = False

    @property
    def in_call(self) -> bool:
        return self._state != "text"

    def feed(self, text: str) -> ChatDelta:
        out = ChatDelta()
        self._buf += text
        while self._buf and self._step(out):
            pass
        return out

    def finish(self, whole: bool) -> tuple[ChatDelta, int | None]:
        """End of output: what is left, and the index of a call that turned back into content (None: none).
        `whole`: nothing was sent yet, so an unclosed call becomes content (the caller drops its deltas)."""
        out, retracted = ChatDelta(), None
        if self._state == "text":
            out.content, self._buf = self._buf, ""
            return out, None
        if self._state == "name" or whole:
            if self._state != "name":
                retracted = len(self.calls) - 1
                self.calls.pop()
            out.content = self._raw + self._buf
        elif self._state == "value" and self._string_value:
            self._emit(out, self._escape(self._buf))
        self._buf, self._raw, self._state = "", "", "text"
        return out, retracted

    # --- the state machine: each step consumes what it can and returns whether to go on ---

    def _step(self, out: ChatDelta) -> bool:
        state, buf = self._state, self._buf
        if state == "text":
            start = buf.find(CALL_OPEN)
            if start < 0:
                keep = _partial_tag(buf, (CALL_OPEN,))
                out.content += buf[: len(buf) - keep]
                self._buf = buf[len(buf) - keep :]
                return False
            out.content += buf[:start]
            self._buf, self._raw, self._name, self._state = buf[start + len(CALL_OPEN) :], CALL_OPEN, "", "name"
            return True
        if state == "name":
            ends = [i for i in (buf.find("\n"), buf.find(KEY_OPEN), buf.find(CALL_CLOSE)) if i >= 0]
            if not ends:
                if len(buf) > MAX_NAME_CHARS + len(KEY_OPEN):
                    return self._unreadable(out)
                return False
            cut = min(ends)
            name = buf[:cut].strip()
            if not name or len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
                return self._unreadable(out)
            self._take(cut)
            self._name, self._pairs, self._state = name, 0, "between"
            self.calls.append("")
            out.tool_calls.append(ToolCallDelta(len(self.calls) - 1, id=f"call_{secrets.token_hex(12)}", name=name))
            return True
        if state in ("between", "after_key"):
            want = KEY_OPEN if state == "between" else VALUE_OPEN
            hits = [(i, t) for t in (want, CALL_CLOSE, KEY_OPEN) if (i := buf.find(t)) >= 0]
            if not hits:  # whitespace or stray text between the parts: skipped, as vLLM's pattern skips it
                keep = _partial_tag(buf, (want, CALL_CLOSE, KEY_OPEN))
                self._take(len(buf) - keep)
                return False
            i, tag = min(hits)
            self._take(i + len(tag))
            if tag == CALL_CLOSE:
                self._close(out)
            elif tag == KEY_OPEN:
                self._key, self._state = "", "key"  # a key without its value is dropped
            else:
                self._value, self._state = "", "value"
                self._string_value = self._key in self.string_args.get(self._name, ())
                if self._string_value:
                    self._emit(out, self._separator() + json.dumps(self._key, ensure_ascii=False) + ': "')
            return True
        if state == "key":
            hits = [(i, t) for t in (KEY_CLOSE, CALL_CLOSE) if (i := buf.find(t)) >= 0]
            if not hits:
                keep = _partial_tag(buf, (KEY_CLOSE, CALL_CLOSE))
                self._key += buf[: len(buf) - keep]
                self._take(len(buf) - keep)
                return False
            i, tag = min(hits)
            self._key += buf[:i]
            self._take(i + len(tag))
            if tag == CALL_CLOSE:
                self._close(out)
            else:
                self._key, self._state = self._key.strip(), "after_key"
            return True
        # value
        hits = [(i, t) for t in (VALUE_CLOSE, CALL_CLOSE) if (i := buf.find(t)) >= 0]
        if not hits:
            keep = _partial_tag(buf, (VALUE_CLOSE, CALL_CLOSE))
            part = buf[: len(buf) - keep]
            if self._string_value:
                self._emit(out, self._escape(part))
            else:
                self._value += part
            self._take(len(buf) - keep)
            return False
        i, tag = min(hits)
        part = buf[:i]
        self._take(i + len(tag))
        if self._string_value:
            self._emit(out, self._escape(part) + '"')
        else:
            value = _value(self._value + part)
            self._emit(
                out,
                self._separator()
                + json.dumps(self._key, ensure_ascii=False)
                + ": "
                + json.dumps(value, ensure_ascii=False),
            )
        self._pairs += 1
        self._state = "between"
        if tag == CALL_CLOSE:
            self._close(out)
        return True

    def _take(self, n: int) -> None:
        self._raw += self._buf[:n]
        self._buf = self._buf[n:]

    def _separator(self) -> str:
        return "{" if self._pairs == 0 else ", "

    @staticmethod
    def _escape(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)[1:-1]

    def _emit(self, out: ChatDelta, arguments: str) -> None:
        if not arguments:
            return
        index = len(self.calls) - 1
        self.calls[index] += arguments
        last = out.tool_calls[-1] if out.tool_calls else None
        if last is not None and last.index == index:
            last.arguments += arguments
        else:
            out.tool_calls.append(ToolCallDelta(index, arguments=arguments))

    def _close(self, out: ChatDelta) -> None:
        self._emit(out, "{}" if self._pairs == 0 else "}")
        self._raw, self._state = "", "text"

    def _unreadable(self, out: ChatDelta) -> bool:
        """The call cannot be a tool call: its text so far is content, and parsing goes on after <tool_call>."""
        out.content += self._raw
        self._raw, self._state = "", "text"
        return True


class ChatOutputParser:
    """One choice's output text -> reasoning, content and tool-call deltas. `tools`: the request's tools when tool
    calls are to be parsed (None: tool-call markup stays in the content)."""

    def __init__(self, in_reasoning: bool, tools: Sequence[Any] | None = None):
        self.reasoning = ReasoningSplitter(in_reasoning)
        self.tools = ToolCallParser(string_arguments(tools)) if tools is not None else None

    def feed(self, text: str) -> ChatDelta:
        reasoning, content = self.reasoning.feed(text)
        return self._content(ChatDelta(reasoning=reasoning), content)

    def finish(self, whole: bool) -> tuple[ChatDelta, int | None]:
        """The rest at the end of the output, and a tool call that turned back into content (ToolCallParser.finish)."""
        reasoning, content = self.reasoning.flush()
        out = self._content(ChatDelta(reasoning=reasoning), content)
        if self.tools is None:
            return out, None
        rest, retracted = self.tools.finish(whole)
        out.extend(rest)
        return out, retracted

    @property
    def called_tools(self) -> bool:
        return bool(self.tools is not None and self.tools.calls)

    def _content(self, out: ChatDelta, content: str) -> ChatDelta:
        if not content:
            return out
        if self.tools is None:
            out.content += content
        else:
            out.extend(self.tools.feed(content))
        return out


def merge_tool_calls(deltas: Sequence[ToolCallDelta]) -> list[ToolCallDelta]:
    """Deltas folded into one complete entry per call, in index order."""
    calls: dict[int, ToolCallDelta] = {}
    for d in deltas:
        call = calls.setdefault(d.index, ToolCallDelta(d.index))
        call.id = call.id or d.id
        call.name = call.name or d.name
        call.arguments += d.arguments
    return [calls[i] for i in sorted(calls)]


def parse_output(text: str, in_reasoning: bool, tools: Sequence[Any] | None = None) -> ChatDelta:
    """A whole output at once, as a non-streamed reply holds it: one complete entry per tool call."""
    parser = ChatOutputParser(in_reasoning, tools)
    out = parser.feed(text)
    rest, retracted = parser.finish(whole=True)
    out.extend(rest)
    out.tool_calls = merge_tool_calls([d for d in out.tool_calls if d.index != retracted])
    return out
