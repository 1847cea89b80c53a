"""spec_check's layer-by-layer watch names the module that first turns finite inputs into NaN."""

from __future__ import annotations

import torch

from moed.engine.llm_engine import EngineConfig, LLMEngine
from moed.ops.bench.spec_check import NonfiniteWatch, drive


def test_nonfinite_watch_names_the_module_that_made_the_nan(tiny_checkpoint):
    e = LLMEngine(EngineConfig(model=tiny_checkpoint, max_running=4, page_size=4, spec_steps=1))

    calls: list[int] = []

    def poison(module, args, output):  # a fault in layer 2's MLP: the last row of its third call
        calls.append(output.shape[0])
        if len(calls) == 3:
            output = output.clone()
            output[-1] = float("nan")
        return output

    layers = e.model.model.layers
    handle = layers[2].mlp.register_forward_hook(poison)
    watch = NonfiniteWatch(e.model)
    errors: list[str] = []
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    _, logprobs = drive(e, prompts, gen=4, per_step=2, errors=errors, watch=watch)
    handle.remove()
    watch.close()
    cause = watch.first_cause()
    assert cause is not None and cause["where"] == "mlp 2", cause
    assert cause["bad_rows"] == [calls[2] - 1] and cause["tokens"] == calls[2]
    assert cause["phase"].startswith("step ") and cause["seqs"]
    # what follows from it is recorded with its input already non-finite
    later = [ev for ev in watch.events if ev is not cause]
    assert later and all(not ev["input_finite"] for ev in later if ev["where"].startswith("attention"))
    # the engine stopped the request whose logits were not finite (a numerical fault), the others finished
    assert e.numerical_faults >= 1 and any("numerical fault" in err for err in errors)
    assert all(lp == lp for lps in logprobs for lp in lps)
    assert len(layers[2].mlp._forward_hooks) == 0 and watch.calls > 0
    assert not torch.isnan(e.model.lm_head.weight).any()
