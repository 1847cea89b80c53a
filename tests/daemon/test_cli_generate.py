"""`moed generate` is the serving engine (LLMEngine) in one process: the same tokens, the daemon's text."""

from __future__ import annotations

import pytest

from moed.daemon.cli import main
from moed.daemon.tokenizer import TextTokenizer
from moed.engine.llm_engine import EngineConfig, LLMEngine
from moed.engine.protocol import SamplingParams


@pytest.mark.parametrize(
    "flags, sampling",
    [
        (["--ignore-eos"], SamplingParams(max_tokens=12, ignore_eos=True)),
        (
            ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5"],
            SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5),
        ),
    ],
)
def test_generate_prints_what_the_engine_generates(tiny_checkpoint, capsys, flags, sampling):
    rc = main(["generate", "--model", tiny_checkpoint, "--device", "cpu", "--max-tokens", "12", *flags, "Grüße, hello"])
    out = capsys.readouterr().out
    assert rc == 0
    tok = TextTokenizer(tiny_checkpoint)
    [ids] = LLMEngine(EngineConfig(model=tiny_checkpoint)).generate([tok.encode("Grüße, hello")], sampling)
    assert out == tok.decode(ids) + "\n"


def test_generate_refuses_bad_sampling_and_engine_settings(tiny_checkpoint, capsys):
    assert main(["generate", "--model", tiny_checkpoint, "--top-p", "2", "x"]) == 2
    assert "top_p" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", tiny_checkpoint, "--moe", "fast", "x"])
    assert "argument --moe: must be one of torch, offload" in capsys.readouterr().err
