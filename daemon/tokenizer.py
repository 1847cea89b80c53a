"""Prompt rendering and tokenisation for the daemon, from a checkpoint's own files, without torch.

Reads `tokenizer.json` (the `tokenizers` library) and the chat template: `chat_template.jinja` if
present, else `tokenizer_config.json`'s "chat_template" (a string, or a list of {name, template}
where "default" is used). Templates are data shipped with a checkpoint, so they are rendered in
jinja2's immutable sandbox with the settings HF transformers uses (trim_blocks, lstrip_blocks,
loop controls, `raise_exception`, a `tojson` that does not HTML-escape, the tokenizer's special tokens as
variables), so a prompt renders to the same text as `apply_chat_template`. Besides `messages` and
`add_generation_prompt` a template receives `tools` (OpenAI function definitions) and the request's
`chat_template_kwargs` (e.g. GLM's `enable_thinking`), as transformers and vLLM pass them.

Encoding goes through the library's batch call, which releases the GIL while Rust works (its plain
`encode` holds it: a long prompt tokenised in a thread would stall the daemon's loop), and skips
the char offsets nobody reads. `count_tokens` counts a long text window by window and stops once
past a limit, so refusing a huge prompt costs what the limit's worth of tokens costs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

COUNT_WINDOW_CHARS = 1 << 16  # count_tokens encodes this much text at a time
COUNT_SLACK_PER_WINDOW = 8  # tokens a window cut can add or remove (the cut is put before a space when one is near)


class TokenizerError(Exception):
    pass


class TemplateError(Exception):
    pass


def _raise_exception(message: str):
    raise TemplateError(message)


class TextTokenizer:
    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        path = self.model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"no tokenizer.json in model directory '{self.model_dir}' (the daemon tokenises "
                "with the checkpoint's own tokenizer.json)"
            )
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"cannot load '{path}': {e}") from e
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        # No token covers more characters than its vocabulary string has (byte-level: one character per byte).
        self.max_token_chars = max(map(len, vocab), default=1)
        # encode_batch_fast (tokenizers >= 0.21) skips offsets; encode_batch also releases the GIL.
        self._encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        self.special_tokens: dict[str, str] = {}  # bos_token, eos_token, ...: template variables, as HF passes them
        self.chat_template = self._load_chat_template()
        self._template = None

    def _load_chat_template(self) -> str | None:
        jinja = self.model_dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        cfg_path = self.model_dir / "tokenizer_config.json"
        if not cfg_path.is_file():
            return None
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"'{cfg_path}' is not valid JSON: {e}") from e
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = cfg.get(key)
            if isinstance(value, dict):  # {"content": "<s>", ...} in older files
                value = value.get("content")
            if isinstance(value, str):
                self.special_tokens[key] = value
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        if tpl is not None and not isinstance(tpl, str):
            raise TokenizerError(f"'{cfg_path}': chat_template must be a string or a list of named templates")
        return tpl

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def count_tokens(self, text: str, add_special_tokens: bool, stop_after: int) -> int:
        """About len(encode(text)) (within count_slack), counted window by window; stops once past `stop_after`."""
        n = start = 0
        while start < len(text) and n <= stop_after:
            end = start + COUNT_WINDOW_CHARS
            if end < len(text):
                space = text.rfind(" ", end - 1024, end)  # cut before a space: pre-tokenizers split there anyway
                end = space if space > start else end
            window = self._encode_batch([text[start:end]], add_special_tokens=add_special_tokens and start == 0)
            n += len(window[0].ids)
            start = end
        return n

    @staticmethod
    def count_slack(chars: int) -> int:
        """How far count_tokens of a text of `chars` characters may be from the exact count."""
        return COUNT_SLACK_PER_WINDOW * (chars // COUNT_WINDOW_CHARS + 1)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text. `template_kwargs` are further template variables (a request's chat_template_kwargs);
        they cannot replace messages, tools or add_generation_prompt."""
        if self.chat_template is None:
            raise TemplateError(
                f"model '{self.model_dir}' has no chat template (tokenizer_config.json has no "
                "chat_template and there is no chat_template.jinja); send prompt or prompt_token_ids"
            )
        import jinja2

        if self._template is None:
            self._template = self._compile()
        variables = {
            **self.special_tokens,
            **(template_kwargs or {}),
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
        }
        try:
            return self._template.render(**variables)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
            raise TemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e

    def _compile(self):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template of '{self.model_dir}' does not compile: {e}") from e

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        # The template writes the special tokens itself (as apply_chat_template does).
        return self.encode(
            self.render_chat(messages, add_generation_prompt, tools, template_kwargs), add_special_tokens=False
        )

    def token_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary (added tokens included), else None."""
        return self.tokenizer.token_to_id(token)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: jinja's own tojson HTML-escapes <, >, & and ' (which would change GLM's tools block).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
