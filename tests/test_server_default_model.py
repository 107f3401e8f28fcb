"""The engine on the default model, loaded as `mistral-lm serve` loads it (GGUF blocks, native kernels).

Log-probabilities served from batched one-row decode steps must equal the library's
teacher-forced ones (`evaluation.token_logprobs`, one prefill over the whole text) within 1e-4:
on the block kernels, whose 8-bit activation grid turns any last-bit difference into a visibly
different logit, that holds only if every step of the forward gives a token the same numbers
whatever else shares its call. Several requests run at once, so their decode steps batch rows
of different lengths.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")

from mistral_lm import runtime  # noqa: E402
from mistral_lm.evaluation import token_logprobs  # noqa: E402
from mistral_lm.server.engine import Delta, Engine, Finished  # noqa: E402

from .conftest import default_model_or_skip  # noqa: E402
from .test_server import _events  # noqa: E402

default_model_or_skip()
TOL = 1e-4  # the bound
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colours are"]


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any]:
    return runtime.load_for_inference(None)


def test_served_logprobs_equal_teacher_forced_on_the_default_load(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=8, max_queue=16)
    try:
        bodies = [{"model": "m", "prompt": p, "max_tokens": 12 + 3 * i, "temperature": 0, "logprobs": 1}
                  for i, p in enumerate(PROMPTS)]
        runs = _events(engine, bodies)  # submitted together, so their steps share batches
        assert all(isinstance(events[-1], Finished) and events[-1].error is None for events in runs)
        served = [[entry for e in events if isinstance(e, Delta) for entry in e.logprobs] for events in runs]
    finally:
        engine.close()
    worst = 0.0
    for prompt, entries in zip(PROMPTS, served):
        ids = tokenizer(prompt)["input_ids"]
        tokens = [e.token for e in entries]
        assert tokens, "nothing was generated"
        expected = token_logprobs(model, torch.tensor([ids + tokens])).logprobs[len(ids) - 1:]
        errors = [abs(e.logprob - float(lp)) for e, lp in zip(entries, expected)]
        worst = max(worst, *errors)
    print(f"max |served - teacher-forced| = {worst:.2e}")
    assert worst < TOL, f"max |served - teacher-forced| = {worst:.2e}"
