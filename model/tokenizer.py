"""Tokenizers for generated checkpoints: a byte-level BPE trained here on a built-in corpus.

Nothing is downloaded. The tokens and the chat template follow GLM-5.1's release: special tokens
`[gMASK]<sop>`, role tokens `<|system|>`, `<|user|>`, `<|assistant|>`, `<|observation|>` (the
end-of-turn tokens GLM-5.1 lists as eos), and the reasoning and tool-call markers `<think>`,
`</think>`, `<tool_call>`, `<arg_key>`, `<arg_value>`, `<tool_response>` (and their closers) as
added tokens that are NOT special, as in GLM's tokenizer: decoding with skip_special_tokens keeps
them, so a server can split reasoning and parse tool calls from the text. The chat template renders
what GLM-4.7 / GLM-5's published template renders (tools block, assistant turns with reasoning and
XML tool calls, tool results after `<|observation|>`, a generation prompt that opens `<think>`, or
closes it when `enable_thinking` is false). Files written: tokenizer.json and tokenizer_config.json
(with the chat template), loadable by `tokenizers` and by transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
# Added tokens kept in decoded text (GLM marks them special=false): reasoning and tool-call markup.
TEXT_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool_response>",
    "</tool_response>",
]
EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# GLM-4.7 / GLM-5's template structure, written with explicit whitespace control so it renders the
# same text with or without jinja's trim_blocks/lstrip_blocks. Tool-call arguments arrive as a mapping
# (servers parse the OpenAI JSON string first); string values are written verbatim, others as JSON.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- if tools -%}"
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{{ '\\n' }}"
    "{%- for tool in tools -%}{{ tool | tojson(ensure_ascii=False) }}{{ '\\n' }}{%- endfor -%}"
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML "
    "format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
    "{%- endif -%}"
    "{%- macro visible_text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for item in content -%}"
    "{%- if item is mapping and item.type == 'text' -%}{{- item.text -}}"
    "{%- elif item is string -%}{{- item -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif content is not none -%}{{- content -}}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(last_user_index=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user_index = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}<|user|>{{- visible_text(m.content) -}}"
    "{%- elif m.role == 'assistant' -%}<|assistant|>"
    "{%- set reasoning = '' -%}{%- set content = visible_text(m.content) -%}"
    "{%- if m.reasoning_content is string -%}{%- set reasoning = m.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}"
    "{%- endif -%}"
    "{%- if ((clear_thinking is defined and not clear_thinking) or loop.index0 > ns.last_user_index)"
    " and reasoning -%}<think>{{- reasoning.strip() -}}</think>"
    "{%- else -%}</think>{%- endif -%}"
    "{%- if content.strip() -%}{{- content.strip() -}}{%- endif -%}"
    "{%- for tc in m.tool_calls or [] -%}"
    "{%- set f = tc.function if tc.function else tc -%}"
    "<tool_call>{{- f.name -}}"
    "{%- for k, v in (f.arguments or {}).items() -%}"
    "<arg_key>{{- k -}}</arg_key><arg_value>{{- v if v is string else v | tojson(ensure_ascii=False) -}}"
    "</arg_value>"
    "{%- endfor -%}"
    "</tool_call>"
    "{%- endfor -%}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if m.content is string -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}<|observation|>{%- endif -%}"
    "<tool_response>{{- m.content -}}</tool_response>"
    "{%- else -%}<|observation|>{%- for tr in m.content -%}"
    "<tool_response>{{- tr.output if tr.output is defined else tr -}}</tool_response>"
    "{%- endfor -%}{%- endif -%}"
    "{%- elif m.role == 'system' -%}<|system|>{{- visible_text(m.content) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{{- '</think>' if (enable_thinking is defined and not enable_thinking) else '<think>' -}}"
    "{%- endif -%}"
)

# A small varied corpus: prose, code, numbers and non-ASCII text, so merges cover common shapes and
# multi-byte characters are split across tokens (the daemon's detokeniser must handle that).
_CORPUS = """
The expert cache keeps the hottest experts of every layer on the GPU and the rest in pinned host memory.
A token at batch one touches eight routed experts per layer and one shared expert.
When an expert misses, its bytes are copied over PCIe or it is computed on the host CPU, or both at once.
Mixture-of-Experts models route each token to a few experts chosen by a sigmoid router with a bias.
Sparse attention keeps the top positions chosen by a lightweight indexer and attends to those only.
Hello, world! How are you today? I am fine, thank you. What time is it? It is half past three.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
def forward(self, x):\n    return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))
for i in range(10):\n    print(i * i, end=" ")
{"model": "glm-5.1", "max_tokens": 128, "temperature": 0.7, "stream": true}
0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 6144 8192 3.14159 2.71828
Grüße aus München. Ça va très bien, merci. ¿Dónde está la biblioteca? Добрый день.
你好，世界。今天天气很好。我们一起去公园散步吧。模型的专家被缓存在显存中。
こんにちは、世界。日本語のテキストも少し入れておきます。
emoji: 🙂 🚀 ✨ — dashes – and “quotes” ‘here’ … done.
"""


def train_tokenizer(vocab_size: int):
    """A byte-level BPE with GLM's special tokens at ids 0..len(SPECIAL_TOKENS)-1 and the text tokens
    (TEXT_TOKENS, not special) right after them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TEXT_TOKENS,  # reserved at the start of the vocabulary
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.strip().splitlines() if line]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    # The trainer adds every reserved token as special; GLM's text tokens must survive skip_special_tokens.
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] in SPECIAL_TOKENS
    return Tokenizer.from_str(json.dumps(data))


def write_tokenizer(out_dir: Path, vocab_size: int, max_length: int) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json; returns the reserved tokens' ids."""
    tok = train_tokenizer(vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + TEXT_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(ids[t]): {
                "content": t,
                "special": t in SPECIAL_TOKENS,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for t in SPECIAL_TOKENS + TEXT_TOKENS
        },
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return ids


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """Render a checkpoint's chat template in a sandbox (templates are data from the checkpoint), with the
    settings and `tojson` filter HF transformers' apply_chat_template uses."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
