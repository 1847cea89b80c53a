"""Tokenizers for generated checkpoints: a byte-level BPE trained here on a built-in corpus.

Nothing is downloaded. The special tokens and chat template follow GLM's conventions
(`[gMASK]<sop>`, role tokens `<|system|>`, `<|user|>`, `<|assistant|>`, `<|observation|>`), and the
end-of-turn tokens are the ones GLM-5.1 lists as eos. Files written: tokenizer.json and
tokenizer_config.json (with the chat template), loadable by `tokenizers` and by transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<think>", "</think>"]
EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
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
    """A byte-level BPE with GLM's special tokens at ids 0..len(SPECIAL_TOKENS)-1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.strip().splitlines() if line]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return tok


def write_tokenizer(out_dir: Path, vocab_size: int, max_length: int) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json; returns the special tokens' ids."""
    tok = train_tokenizer(vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(ids[t]): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                               "normalized": False, "single_word": False} for t in SPECIAL_TOKENS},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return ids


def render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render a checkpoint's chat template in a sandbox (templates are data from the checkpoint)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
